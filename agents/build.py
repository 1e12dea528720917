"""Build an agent (modules, loss, optimisers, target updater) from the Hydra config; every
shape comes from the environment's specs."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import EnvBase
from torchrl.objectives import LossModule, SoftUpdate

from agents.agent import Agent
from agents.augment import RandomShift
from agents.consistency_policy import (
    CP3ERLoss,
    QSelectedPolicy,
    make_consistency_actor,
    make_denoiser,
    make_policy,
)
from agents.critic import MoGCritic
from agents.drqv2 import DoubleQCritic, DrQV2Loss, ScheduledGaussianNoise, make_drqv2_actor
from agents.encoder import PixelEncoder, StateEncoder
from agents.stability import AdaptiveWeight
from cp3er.choices import AGENTS, COMPILE_MODES, CONSISTENCY_LOSSES, obs_key_for
from cp3er.consistency import ConsistencyDistillationLoss, ConsistencyTrainingLoss, KarrasSchedule

#: DrQ-v2's exploration-noise decay length in agent steps per task difficulty
#: (``stddev_schedule: linear(1.0, 0.1, N)`` of its easy / medium / hard task configs).
DRQV2_STDDEV_STEPS = {"easy": 100_000, "medium": 500_000, "hard": 2_000_000}


def make_encoder(obs: str, obs_shape: torch.Size, channels_last: bool = False
                 ) -> tuple[nn.Module, int]:
    """DrQ-v2 conv encoder for pixels, identity for states; returns (module, repr_dim)."""
    if obs == "pixels":
        encoder = PixelEncoder(tuple(obs_shape), channels_last=channels_last)
    else:
        encoder = StateEncoder(int(obs_shape[-1]))
    return encoder, encoder.repr_dim


def _adam(params, lr: float, fused: bool = False, capturable: bool = False
          ) -> torch.optim.Optimizer:
    """Adam; ``fused`` runs the whole step as one kernel, ``capturable`` keeps its step
    count on the device (a CUDA graph can capture the step); same update rule."""
    return torch.optim.Adam(list(params), lr=lr, fused=fused or None, capturable=capturable)


def _optimizers(loss: LossModule, encoder: TensorDictModule, actor: TensorDictModule,
                lr: float, fused: bool = False, capturable: bool = False
                ) -> dict[str, torch.optim.Optimizer]:
    """Separate Adam optimisers for critic, actor, encoder (if any) and distillation teacher."""
    options = {"fused": fused, "capturable": capturable}
    optimizers = {
        "critic": _adam(loss.critic_params.values(True, True), lr, **options),
        "actor": _adam(actor.parameters(), lr, **options),
    }
    teacher = getattr(loss, "teacher", None)
    if teacher is not None:
        optimizers["teacher"] = _adam(teacher.parameters(), lr, **options)
    encoder_params = list(encoder.parameters())
    if encoder_params:
        optimizers["encoder"] = _adam(encoder_params, lr, **options)
    return optimizers


def _cp3er_loss(cfg: DictConfig, env: EnvBase, encoder: TensorDictModule, repr_dim: int,
                action_dim: int, augmentation: nn.Module | None) -> tuple[LossModule, None]:
    acfg = cfg.agent
    schedule = KarrasSchedule(acfg.consistency.sigma_min, acfg.consistency.sigma_max,
                              acfg.consistency.rho, acfg.consistency.num_steps,
                              acfg.consistency.sigma_data)
    network = {"hidden_dim": cfg.hidden_dim, "schedule": schedule, "clip": str(acfg.clip),
               "trunk_dim": cfg.feature_dim if acfg.actor_trunk else None}
    actor = make_consistency_actor(repr_dim, action_dim, deterministic=str(acfg.eval_noise),
                                   **network)
    critic = MoGCritic(repr_dim, action_dim, feature_dim=cfg.feature_dim,
                       hidden_dim=cfg.hidden_dim, num_components=acfg.num_components,
                       init_scale=acfg.init_scale)
    adaptive_lambda, statistic = _adaptive_lambda(acfg)
    loss = CP3ERLoss(
        encoder, actor, critic,
        lambda_consistency=acfg.lambda_consistency,
        target_samples=acfg.target_samples,
        consistency_loss=_consistency_loss(acfg.consistency, schedule,
                                           lambda: make_denoiser(repr_dim, action_dim, **network)),
        augmentation=augmentation,
        share_condition=cfg.perf.share_condition,
        ema_decay=acfg.consistency.ema_decay,
        normalize_q=acfg.stability.normalize_q,
        bound_penalty=acfg.stability.bound_penalty,
        adaptive_lambda=adaptive_lambda,
        adaptive_statistic=statistic,
    )
    return loss, None


def _adaptive_lambda(acfg: DictConfig) -> tuple[AdaptiveWeight | None, str]:
    """``(weight, statistic)`` of ``agent.stability.target_spread`` (``action_spread`` at it)
    or ``target_bound_frac`` (``action_bound_frac`` under it); ``(None, ...)``: fixed lambda."""
    st = acfg.stability
    options = {"lr": st.lambda_lr, "minimum": st.lambda_min, "maximum": st.lambda_max}
    if st.target_spread is not None:
        return (AdaptiveWeight(acfg.lambda_consistency, st.target_spread, **options),
                "action_spread")
    if st.target_bound_frac is not None:
        return (AdaptiveWeight(acfg.lambda_consistency, st.target_bound_frac,
                               raise_when="above", **options), "action_bound_frac")
    return None, "action_spread"


def _consistency_loss(ccfg: DictConfig, schedule: KarrasSchedule,
                      make_teacher) -> nn.Module:
    """The actor's regulariser named by ``agent.consistency.loss``."""
    clip_outputs, name = ccfg.clip_outputs, ccfg.loss
    if name == "distillation":
        return ConsistencyDistillationLoss(make_teacher(), solver=str(ccfg.solver),
                                           schedule=schedule, clip_outputs=clip_outputs)
    if name != "training":
        raise ValueError(f"agent.consistency.loss={name!r}; valid: {CONSISTENCY_LOSSES}")
    return ConsistencyTrainingLoss(schedule, coupling=str(ccfg.coupling), mu=ccfg.mu,
                                   clip_outputs=clip_outputs)


def drqv2_stddev_steps(cfg: DictConfig) -> int:
    """Agent steps of DrQ-v2's noise decay: ``agent.stddev_steps`` or the difficulty's."""
    steps = cfg.agent.stddev_steps
    if steps is None:
        steps = DRQV2_STDDEV_STEPS[cfg.difficulty]
    return int(steps)


def _drqv2_loss(cfg: DictConfig, env: EnvBase, encoder: TensorDictModule, repr_dim: int,
                action_dim: int, augmentation: nn.Module | None
                ) -> tuple[LossModule, ScheduledGaussianNoise]:
    acfg = cfg.agent
    actor = make_drqv2_actor(repr_dim, action_dim, feature_dim=cfg.feature_dim,
                             hidden_dim=cfg.hidden_dim)
    critic = DoubleQCritic(repr_dim, action_dim, cfg.feature_dim, cfg.hidden_dim)
    exploration = ScheduledGaussianNoise(env.action_spec, acfg.stddev_init, acfg.stddev_final,
                                         drqv2_stddev_steps(cfg))
    loss = DrQV2Loss(encoder, actor, critic, exploration, stddev_clip=acfg.stddev_clip,
                     augmentation=augmentation)
    return loss, exploration


def compile_networks(loss: LossModule, mode: str = "default") -> None:
    """``torch.compile`` the encoder's conv stack and the actor network in place (state dicts
    unchanged). Not the critic: it runs under functional parameter swaps, which would
    recompile."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"perf.compile_mode={mode!r}; valid: {COMPILE_MODES}")
    encoder = loss.encoder.module
    if isinstance(encoder, PixelEncoder):
        encoder.convnet.compile(mode=mode)
    actor = loss.actor.module
    if hasattr(actor, "denoiser"):
        actor.denoiser.network.mlp.compile(mode=mode)
    elif hasattr(actor, "policy"):
        actor.policy.compile(mode=mode)


def _acting_actor(cfg: DictConfig, loss: LossModule) -> TensorDictModule:
    """The actor the policy runs: the loss's own, or (CP3ER with
    ``agent.stability.act_candidates`` > 1) one choosing among candidates by Q."""
    stability = cfg.agent.get("stability", {})
    candidates = int(stability.get("act_candidates", 1))
    if candidates <= 1:
        return loss.actor
    selector = QSelectedPolicy(loss, candidates, float(stability.act_temperature))
    return TensorDictModule(selector, in_keys=loss.actor.in_keys, out_keys=loss.actor.out_keys)


_LOSS_BUILDERS = {"cp3er": _cp3er_loss, "drqv2": _drqv2_loss}


def build_agent(cfg: DictConfig, env: EnvBase, device: str | torch.device = "cpu") -> Agent:
    """The agent named by ``cfg.agent.name`` for ``env`` (specs give every shape)."""
    name = cfg.agent.name
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; valid: {AGENTS}")
    obs_key = obs_key_for(cfg.obs)
    obs_shape = env.observation_spec[obs_key].shape
    action_dim = int(env.action_spec.shape[-1])
    encoder_net, repr_dim = make_encoder(cfg.obs, obs_shape,
                                         channels_last=cfg.perf.channels_last)
    encoder = TensorDictModule(encoder_net, in_keys=[obs_key], out_keys=["features"])
    augmentation = RandomShift(4) if cfg.obs == "pixels" else None
    loss, exploration = _LOSS_BUILDERS[name](cfg, env, encoder, repr_dim, action_dim,
                                             augmentation)
    loss.to(device)
    updater = SoftUpdate(loss, tau=cfg.agent.critic_tau)
    cuda_graph = bool(cfg.perf.cuda_graph)
    optimizers = _optimizers(loss, encoder, loss.actor, cfg.lr,
                             fused=cfg.perf.fused_adam, capturable=cuda_graph)
    if cfg.perf.compile:
        compile_networks(loss, str(cfg.perf.compile_mode))
    policy = make_policy(encoder, _acting_actor(cfg, loss))
    grad_clip = cfg.optim.grad_clip
    actor_clip = cfg.agent.get("stability", {}).get("actor_grad_clip")  # CP3ER only
    return Agent(policy, loss, optimizers, updater, obs_key,
                 grad_clip=None if grad_clip is None else float(grad_clip),
                 actor_grad_clip=None if actor_clip is None else float(actor_clip),
                 exploration=exploration, precision=str(cfg.perf.precision),
                 cuda_graph=cuda_graph)
