"""Build an agent (modules, loss, optimisers, target updater) from the Hydra config.

Shapes come from the environment's specs, never typed by hand (DESIGN: drqv2 / TD-MPC2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.envs import EnvBase
from torchrl.objectives import LossModule, SoftUpdate

from agents.augment import RandomShift
from agents.cp3er import CP3ERLoss, make_consistency_actor, make_policy
from agents.critic import MoGCritic
from agents.encoder import PixelEncoder, StateEncoder
from cp3er.consistency import ConsistencyTrainingLoss, KarrasSchedule

AGENTS = ("cp3er",)


@dataclass
class Agent:
    """Everything the training loop and the evaluator need of an agent."""

    policy: TensorDictSequential  # observation -> action (acting)
    loss: LossModule
    optimizers: dict[str, torch.optim.Optimizer]
    updater: SoftUpdate
    obs_key: str
    grad_clip: float | None = None  # max global grad norm per optimiser step (None: off)

    def state_dict(self) -> dict:
        return {
            "loss": self.loss.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
        }

    def _step(self, names: tuple[str, ...], loss: torch.Tensor) -> None:
        optimizers = [self.optimizers[n] for n in names if n in self.optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            for optimizer in optimizers:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for optimizer in optimizers:
            optimizer.step()

    def update(self, batch) -> dict[str, float]:
        """One drqv2-style update: critic (+ encoder) step, then actor step with the
        updated critic, then the Polyak update of the target critic."""
        loss_critic, critic_meta = self.loss.critic_loss(batch)
        self._step(("encoder", "critic"), loss_critic)
        loss_actor, actor_meta = self.loss.actor_loss(batch)
        self._step(("actor",), loss_actor)
        self.updater.step()
        metrics = {"loss_critic": loss_critic.detach(), "loss_actor": loss_actor.detach(),
                   **critic_meta, **actor_meta}
        return {k: float(v) for k, v in metrics.items()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])


def obs_key_for(obs: str) -> str:
    return "pixels" if obs == "pixels" else "observation"


def make_encoder(obs: str, obs_shape: torch.Size) -> tuple[nn.Module, int]:
    """DrQ-v2 conv encoder for pixels, identity for states; returns (module, repr_dim)."""
    if obs == "pixels":
        encoder = PixelEncoder(tuple(obs_shape))
    else:
        encoder = StateEncoder(int(obs_shape[-1]))
    return encoder, encoder.repr_dim


def _adam(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(list(params), lr=lr)


def build_agent(cfg: DictConfig, env: EnvBase, device: str | torch.device = "cpu") -> Agent:
    """The agent named by ``cfg.agent.name`` for ``env`` (specs give every shape)."""
    name = cfg.agent.name
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; valid: {AGENTS}")
    obs_key = obs_key_for(cfg.obs)
    obs_shape = env.observation_spec[obs_key].shape
    action_dim = int(env.action_spec.shape[-1])
    encoder_net, repr_dim = make_encoder(cfg.obs, obs_shape)
    encoder = TensorDictModule(encoder_net, in_keys=[obs_key], out_keys=["features"])
    acfg = cfg.agent
    ccfg = acfg.consistency
    schedule = KarrasSchedule(ccfg.sigma_min, ccfg.sigma_max, ccfg.rho, ccfg.num_steps,
                              ccfg.sigma_data)
    actor = make_consistency_actor(
        repr_dim, action_dim, hidden_dim=cfg.hidden_dim,
        trunk_dim=cfg.feature_dim if acfg.actor_trunk else None,
        schedule=schedule, clip=acfg.clip,
    )
    critic = MoGCritic(repr_dim, action_dim, feature_dim=cfg.feature_dim,
                       hidden_dim=cfg.hidden_dim, num_components=acfg.num_components,
                       init_scale=acfg.init_scale)
    loss = CP3ERLoss(
        encoder, actor, critic,
        lambda_consistency=acfg.lambda_consistency,
        target_samples=acfg.target_samples,
        consistency_loss=ConsistencyTrainingLoss(schedule, coupling=ccfg.coupling, mu=ccfg.mu),
        augmentation=RandomShift(4) if cfg.obs == "pixels" else None,
    )
    loss.to(device)
    updater = SoftUpdate(loss, tau=acfg.critic_tau)
    optimizers = {
        "critic": _adam(loss.critic_params.values(True, True), cfg.lr),
        "actor": _adam(actor.parameters(), cfg.lr),
    }
    encoder_params = list(encoder.parameters())
    if encoder_params:
        optimizers["encoder"] = _adam(encoder_params, cfg.lr)
    policy = make_policy(encoder, actor)
    grad_clip = cfg.get("optim", {}).get("grad_clip")
    return Agent(policy, loss, optimizers, updater, obs_key,
                 grad_clip=None if grad_clip is None else float(grad_clip))
