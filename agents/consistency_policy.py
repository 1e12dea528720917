"""The CP3ER agent as TorchRL parts: a consistency actor module and a LossModule.

CP3ER (Li et al., NeurIPS 2024, arXiv 2410.00051): a one-step consistency policy, a MoG
critic and the actor loss ``-Q(s, pi(s)) + lambda * L_c(a ~ replay, s)``, the consistency
loss on replayed actions standing in for an entropy term (docs/method.md).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictSequential
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.data import Bounded, Composite, TensorSpec
from torchrl.envs.utils import ExplorationType, exploration_type
from torchrl.objectives import LossModule

from agents.actor_critic_loss import EncoderActorCriticLoss
from agents.critic import MoGCritic, mog_log_prob, mog_mean
from agents.policy_stats import action_spread, bound_fraction
from agents.stability import AdaptiveWeight, bound_penalty, normalized_q_term
from cp3er.choices import DETERMINISTIC_MODES
from cp3er.consistency import (
    ConditionalMLP,
    ConsistencyTrainingLoss,
    ConstantsModule,
    Denoiser,
    DenoisingLoss,
    KarrasSchedule,
    ProjectedCondition,
    ema_target,
    ema_update,
    sample_one_step,
    sample_one_step_unclipped,
    sample_zero_noise,
)

#: States of a batch (its first ones) and draws per state of the ``action_spread`` metric.
SPREAD_STATES, SPREAD_SAMPLES = 16, 4


class ConsistencyPolicy(ConstantsModule):
    """``features -> action``: one-step consistency sampling ``a = D(80 z, 80 | s)``.

    Draws its noise in ``forward``, so TorchRL objectives (``TD3Loss``, ``DDPGLoss``) call it
    like a deterministic actor; gradients flow through the denoiser. Under
    ``ExplorationType.DETERMINISTIC`` ``"zero_noise"`` acts ``D(0, sigma_max | s)`` (as
    ``DiffusionActor`` starts from zeros; repeatable, not a sample) and ``"sample"`` keeps
    sampling (the CP3ER reference's evaluation): docs/torchrl_actor.md.

    The denoiser works in ``[-1, 1]``; ``bounds=(low, high)`` maps it onto the action box,
    ``a = low + (u + 1) (high - low) / 2`` (:meth:`to_unit` inverts it for replayed actions).
    ``low``/``high`` are :class:`ConstantsModule` constants: they follow ``.to()`` but are
    neither optimised nor saved (they come from the spec).
    """

    constants = ("low", "high")

    def __init__(self, denoiser: Denoiser, action_dim: int, *,
                 deterministic: str = "zero_noise",
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        if deterministic not in DETERMINISTIC_MODES:
            raise ValueError(f"deterministic must be one of {DETERMINISTIC_MODES}, "
                             f"got {deterministic!r}")
        self.denoiser = denoiser
        self.action_dim = action_dim
        self.deterministic = deterministic
        self.bounded = bounds is not None
        self.low, self.high = (None, None) if bounds is None else (
            torch.as_tensor(b, dtype=torch.float32) for b in bounds)

    def extra_repr(self) -> str:
        bounds = (f", low={self.low.tolist()}, high={self.high.tolist()}" if self.bounded
                  else ", bounds=[-1, 1]")
        return f"action_dim={self.action_dim}, deterministic={self.deterministic!r}{bounds}"

    def forward(self, features: torch.Tensor | ProjectedCondition) -> torch.Tensor:
        if (self.deterministic == "zero_noise"
                and exploration_type() == ExplorationType.DETERMINISTIC):
            action = sample_zero_noise(self.denoiser, features, self.action_dim)
        else:
            action = sample_one_step(self.denoiser, features, self.action_dim)
        return self.from_unit(action)

    def from_unit(self, action: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` -> the action bounds (the tensor itself without bounds)."""
        if not self.bounded:
            return action
        return self.low + (action + 1) * (self.high - self.low) / 2

    def to_unit(self, action: torch.Tensor) -> torch.Tensor:
        """The action bounds -> ``[-1, 1]`` (the tensor itself without bounds)."""
        if not self.bounded:
            return action
        return 2 * (action - self.low) / (self.high - self.low) - 1

    def condition(self, features: torch.Tensor) -> torch.Tensor | ProjectedCondition:
        """``features`` projected once through the network's first layer when it supports
        it (:class:`ConditionalMLP`), for several calls on the same states."""
        project = getattr(self.denoiser.network, "project", None)
        return features if project is None else project(features)

    @torch.no_grad()
    def samples_at(self, cond: torch.Tensor | ProjectedCondition, num_states: int,
                   num_samples: int) -> torch.Tensor:
        """``[num_samples, num_states, action_dim]`` one-step actions at the first
        ``num_states`` states (no gradient; the states' projection computed once)."""
        if isinstance(cond, ProjectedCondition):
            hidden, raw, owner = cond.hidden[:num_states], cond.cond[:num_states], cond.owner
        else:
            projected = self.condition(cond[:num_states])
            if not isinstance(projected, ProjectedCondition):  # a network without project()
                return self(projected.expand(num_samples, *projected.shape))
            hidden, raw, owner = projected.hidden, projected.cond, projected.owner
        cond = ProjectedCondition(hidden.expand(num_samples, *hidden.shape),
                                  raw.expand(num_samples, *raw.shape), owner)
        return self(cond)


def set_deterministic_mode(module: nn.Module, mode: str) -> int:
    """Set ``deterministic`` of every :class:`ConsistencyPolicy` in ``module``; returns how
    many (0 for DrQ-v2, whose actor acts its mean anyway)."""
    if mode not in DETERMINISTIC_MODES:
        raise ValueError(f"deterministic mode must be one of {DETERMINISTIC_MODES}, "
                         f"got {mode!r}")
    policies = [m for m in module.modules() if isinstance(m, ConsistencyPolicy)]
    for policy in policies:
        policy.deterministic = mode
    return len(policies)


def spec_bounds(spec: TensorSpec, action_dim: int, key: NestedKey = "action"
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(low, high)``, each ``[action_dim]``, of a continuous ``Bounded`` spec (or a
    ``Composite`` holding one at ``key``); ``None`` for ``[-1, 1]``. ``ValueError`` for any
    other spec (docs/torchrl_actor.md, "The action spec")."""
    if isinstance(spec, Composite):
        if key not in spec.keys(True):
            raise ValueError(f"the action spec is a Composite without {key!r}: pass the "
                             "action's own spec (env.action_spec)")
        spec = spec[key]
    if not isinstance(spec, Bounded) or not spec.dtype.is_floating_point:
        raise ValueError(
            f"the consistency actor needs a continuous Bounded action spec, got "
            f"{type(spec).__name__} (dtype {spec.dtype}): its actions are a box, mapped "
            "affinely onto [low, high]; an unbounded or discrete action space is not "
            "supported (bound it, e.g. with TorchRL's ActionScaling/ClipTransform, or pass no "
            "spec for [-1, 1])")
    if spec.shape[-1:] != (action_dim,):
        raise ValueError(f"the action spec's shape {tuple(spec.shape)} does not end in "
                         f"action_dim={action_dim}")
    low, high = (torch.as_tensor(b).detach().cpu().to(torch.float32).reshape(-1, action_dim)
                 for b in (spec.space.low, spec.space.high))
    if not (bool((low == low[0]).all()) and bool((high == high[0]).all())):
        raise ValueError("the action spec's bounds differ between batch entries; the "
                         "consistency actor takes one [low, high] per action dimension")
    low, high = low[0], high[0]
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"the action spec has infinite bounds (low {low.tolist()}, high "
                         f"{high.tolist()}): the consistency actor needs a finite box")
    if not bool((low < high).all()):
        raise ValueError(f"the action spec needs low < high in every dimension, got low "
                         f"{low.tolist()}, high {high.tolist()}")
    if bool((low == -1).all() and (high == 1).all()):
        return None
    return low, high


#: The standalone actor's default width, for state tasks (as TorchRL's DiffusionActor and
#: TD3 examples); the CP3ER agent passes its config's ``hidden_dim`` (the paper's 1024).
STATE_HIDDEN_DIM = 256


def make_consistency_actor(
    repr_dim: int | None,
    action_dim: int,
    *,
    in_key: NestedKey = "features",
    out_key: NestedKey = "action",
    spec: TensorSpec | None = None,
    deterministic: str = "zero_noise",
    hidden_dim: int = STATE_HIDDEN_DIM,
    **denoiser: Any,
) -> TensorDictModule:
    """The CP3ER actor as a ``TensorDictModule`` ``in_key -> out_key`` (docs/torchrl_actor.md).

    Args:
        repr_dim: size of the conditioning input; ``None``: a lazy first layer (call the
            actor once before building an optimiser or a loss from it).
        action_dim: size of the action.
        spec: the env's action spec, a continuous ``Bounded`` one whose ``[low, high]`` the
            actions are mapped onto (:func:`spec_bounds`); ``None``: actions in ``[-1, 1]``.
        deterministic: the action under ``ExplorationType.DETERMINISTIC``: ``"zero_noise"``
            (TorchRL's convention, ``D(0, sigma_max | s)``) or ``"sample"`` (the reference).
            Train under ``RANDOM`` (with a bare TorchRL loss set its
            ``deterministic_sampling_mode``).
        hidden_dim: MLP width (256 for states; the pixel paper's 1024).
        denoiser: keywords of :func:`make_denoiser`; ``trunk_dim=None`` reads the raw
            features (the reference), an int adds a Linear+LayerNorm+Tanh trunk.

    No additive exploration noise: each action is a fresh sample, and the regulariser keeps
    their spread.
    """
    bounds = None if spec is None else spec_bounds(spec, action_dim, out_key)
    network = make_denoiser(repr_dim, action_dim, hidden_dim=hidden_dim, **denoiser)
    return TensorDictModule(
        ConsistencyPolicy(network, action_dim, deterministic=deterministic, bounds=bounds),
        in_keys=[in_key], out_keys=[out_key],
    )


def make_denoiser(
    repr_dim: int | None,
    action_dim: int,
    *,
    hidden_dim: int = STATE_HIDDEN_DIM,
    num_layers: int = 3,
    trunk_dim: int | None = None,
    schedule: KarrasSchedule | None = None,
    clip: str = "clamp",
) -> Denoiser:
    """``D(x, t | features)``: the actor's network (a :class:`ConditionalMLP`; ``repr_dim``
    ``None``: lazy first layer) in the EDM preconditioning, acting in ``[-1, 1]``; also
    the diffusion teacher of ``agent.consistency.loss=distillation``."""
    network = ConditionalMLP(action_dim, repr_dim, hidden_dim, num_layers, trunk_dim=trunk_dim)
    return Denoiser(network, schedule or KarrasSchedule(), clip=clip)


def make_policy(encoder: TensorDictModule, actor: TensorDictModule) -> TensorDictSequential:
    """Observation -> features -> action, the module a collector or evaluator runs."""
    return TensorDictSequential(encoder, actor)


class QSelectedPolicy(nn.Module):
    """``features -> action``: one of ``num_candidates`` one-step samples drawn by
    ``softmax(Q / temperature)`` (CPQL's online action selection, Chen et al. 2024), the best
    under ``ExplorationType.DETERMINISTIC`` (a ``zero_noise`` actor: ``D(0, sigma_max | s)``).
    Q: the loss's current critic's mixture mean. Acting only; training is unchanged.

    Holds the loss by reference, not as a submodule: it adds no state to save.
    """

    def __init__(self, loss: CP3ERLoss, num_candidates: int, temperature: float = 1.0
                 ) -> None:
        super().__init__()
        if num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self._loss = (loss,)  # a tuple: not a submodule
        self.num_candidates, self.temperature = num_candidates, float(temperature)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        loss = self._loss[0]
        deterministic = exploration_type() == ExplorationType.DETERMINISTIC
        if deterministic and loss.policy.deterministic == "zero_noise":
            return loss.policy(features)
        expanded = features.expand(self.num_candidates, *features.shape)
        candidates = loss.policy(expanded)  # [N, *batch, action_dim]
        with loss.critic_params.to_module(loss.critic):
            q = loss.critic.mean(expanded, candidates).squeeze(-1)  # [N, *batch]
        if deterministic:
            choice = q.argmax(0)
        else:
            logits = (q / self.temperature).movedim(0, -1)
            choice = torch.distributions.Categorical(logits=logits).sample()
        index = choice.unsqueeze(0).unsqueeze(-1).expand(1, *candidates.shape[1:])
        return candidates.gather(0, index).squeeze(0)


class CP3ERLoss(EncoderActorCriticLoss):
    """CP3ER objective: MoG critic NLL and ``-Q + lambda * L_c`` actor loss (docs/api.md).

    Reads a replay batch with n-step targets folded in (``cp3er.replay``): ``observation``,
    ``action``, ``("next", observation)``, ``("next", "reward")`` (n-step discounted sum),
    ``("next", "discount")`` (``gamma^n'`` times non-termination: truncations bootstrap).

    * Critic: ``-mean log p_online(y | s, a)``, ``y = r_n + discount * q``, ``q`` drawn
      ``target_samples`` times from the target mixture at ``(s', pi(s'))``. Trains critic
      and encoder.
    * Actor: ``-mean Q(s, pi(s)) + lambda * mean L_c(a_replay, s)`` on detached features and
      critic parameters. Trains the actor only.
    * Teacher (a distillation ``consistency_loss`` only): the EDM denoising loss of its
      diffusion teacher on replayed actions; trains the teacher only.

    :meth:`critic_loss`, :meth:`actor_loss`, :meth:`teacher_loss` take the features and
    return ``(loss, metadata)`` for :meth:`agents.agent.Agent.update` (critic step, then
    actor step on the updated critic: the reference's order).

    Args:
        encoder, actor, critic: ``observation -> features``, the consistency actor, the critic.
        lambda_consistency: lambda (0.05).
        target_samples: draws of the target mixture per transition (20).
        consistency_loss: ``L_c``, any loss of the core's signature (default: consistency
            training; a ``ConsistencyDistillationLoss`` brings a teacher).
        share_condition: project the states through the actor's first layer once for all
            its calls on ``s`` (same values and gradients; one 39,200-wide matmul, not four).
        denoising_loss: the teacher's loss (default :class:`DenoisingLoss`).
        ema_decay: an EMA target ``theta^-`` for ``L_c`` (Song et al. 2023); ``None``: the
            online denoiser without gradient (the reference).
        normalize_q, bound_penalty, adaptive_lambda, adaptive_statistic: the collapse
            remedies, off by default (:mod:`agents.stability`).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from agents.encoder import StateEncoder
        >>> enc = TensorDictModule(StateEncoder(5), ["observation"], ["features"])
        >>> actor = make_consistency_actor(5, 2, hidden_dim=32)
        >>> critic = MoGCritic(5, 2, feature_dim=8, hidden_dim=32)
        >>> loss = CP3ERLoss(enc, actor, critic)
        >>> td = TensorDict({"observation": torch.randn(4, 5), "action": torch.rand(4, 2),
        ...     "next": {"observation": torch.randn(4, 5), "reward": torch.randn(4, 1),
        ...              "discount": torch.full((4, 1), 0.99)}}, [4])
        >>> sorted(k for k in loss(td).keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_critic']
    """

    critic: MoGCritic
    #: Train on the policy's samples (TorchRL's default ``DETERMINISTIC`` would give a
    #: ``zero_noise`` actor's ``D(0, sigma_max | s)``).
    deterministic_sampling_mode = ExplorationType.RANDOM

    def __init__(
        self,
        encoder: TensorDictModule,
        actor: TensorDictModule,
        critic: MoGCritic,
        *,
        lambda_consistency: float = 0.05,
        target_samples: int = 20,
        consistency_loss: nn.Module | None = None,
        augmentation: nn.Module | None = None,
        share_condition: bool = True,
        denoising_loss: DenoisingLoss | None = None,
        ema_decay: float | None = None,
        normalize_q: bool = False,
        bound_penalty: float = 0.0,
        adaptive_lambda: AdaptiveWeight | None = None,
        adaptive_statistic: str = "action_spread",
    ) -> None:
        super().__init__(encoder, actor, critic, augmentation=augmentation)
        if bound_penalty < 0:
            raise ValueError(f"bound_penalty must be >= 0, got {bound_penalty}")
        self.share_condition = share_condition
        self.lambda_consistency = lambda_consistency
        self.normalize_q = normalize_q
        self.bound_penalty = float(bound_penalty)
        self.adaptive_lambda = adaptive_lambda
        if adaptive_statistic not in ("action_spread", "action_bound_frac"):
            raise ValueError("adaptive_statistic must be action_spread or action_bound_frac, "
                             f"got {adaptive_statistic!r}")
        self.adaptive_statistic = adaptive_statistic
        self.target_samples = target_samples
        self.consistency_loss = consistency_loss or ConsistencyTrainingLoss(
            self.policy.denoiser.schedule
        )
        self.denoising_loss = None
        if self.teacher is not None:
            self.denoising_loss = denoising_loss or DenoisingLoss()
        self.ema_denoiser = (None if ema_decay is None
                             else ema_target(self.policy.denoiser, ema_decay))

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the EMA target towards the actor's denoiser (no-op without one)."""
        if self.ema_denoiser is not None:
            ema_update(self.ema_denoiser, self.policy.denoiser)

    @torch.no_grad()
    def after_actor_step(self, metrics: dict[str, torch.Tensor]) -> None:
        """After each actor step: the EMA target, then (with ``adaptive_lambda``) one
        dual-ascent step of lambda from the step's ``adaptive_statistic``."""
        self.update_ema()
        if self.adaptive_lambda is not None:
            self.adaptive_lambda.step(metrics[self.adaptive_statistic])

    @property
    def consistency_weight(self) -> torch.Tensor | float:
        """lambda of the actor loss: the adaptive weight's current value, else the fixed
        ``lambda_consistency``."""
        if self.adaptive_lambda is not None:
            return self.adaptive_lambda.value
        return self.lambda_consistency

    @property
    def policy(self) -> ConsistencyPolicy:
        return self.actor.module

    @property
    def teacher(self) -> nn.Module | None:
        """The diffusion teacher of a distillation ``consistency_loss``, else ``None``."""
        return getattr(self.consistency_loss, "teacher", None)

    # -- losses --------------------------------------------------------------------------
    def critic_loss(self, tensordict: TensorDictBase, features: torch.Tensor,
                    next_features: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """MoG negative log-likelihood of sampled n-step targets (eq. 8 of the paper with
        the reference's sampled targets)."""
        action = tensordict[self.tensor_keys.action]
        with torch.no_grad():
            next_action = self.policy(next_features)  # in the actor's bounds, as replayed
            with self.target_critic_params.to_module(self.critic):
                q_samples = self.critic.sample_values(
                    next_features, next_action, self.target_samples
                )
            reward, discount = self.td_target_inputs(tensordict)
            target = reward + discount * q_samples  # [B, S]
        with self.critic_params.to_module(self.critic):
            loc, scale, logits = self.critic(features, action)
        nll = -mog_log_prob(loc, scale, logits, target).mean()
        metadata = {
            "q_mean": mog_mean(loc, logits).mean().detach(),
            "target_mean": target.mean().detach(),
            "critic_std": (torch.softmax(logits, -1) * scale).sum(-1).mean().detach(),
        }
        return nll, metadata

    def actor_loss(self, tensordict: TensorDictBase, features: torch.Tensor
                   ) -> tuple[torch.Tensor, dict]:
        """``-mean Q(s, pi(s)) + lambda * mean L_c(a_replay, s)`` (+ enabled remedies)."""
        keys = self.tensor_keys
        features = features.detach()
        cond = self.policy.condition(features) if self.share_condition else features
        denoiser = self.policy.denoiser
        # = self.policy(cond), the same draw: kept before the clip for the bound penalty
        unclipped = sample_one_step_unclipped(denoiser, cond, self.policy.action_dim)
        unit_action = denoiser.apply_clip(unclipped)  # in [-1, 1]
        action = self.policy.from_unit(unit_action)  # in the actor's bounds
        with self.critic_params.detach().to_module(self.critic):
            q = self.critic.mean(features, action)
        consistency, _ = self.consistency_loss(
            denoiser, self.policy.to_unit(tensordict[keys.action]), cond,
            target=self.ema_denoiser)
        q_term = normalized_q_term(q)[0] if self.normalize_q else -q.mean()
        weight = self.consistency_weight
        loss = q_term + weight * consistency.mean()
        if self.bound_penalty > 0:
            loss = loss + self.bound_penalty * bound_penalty(unclipped)
        samples = self.policy.samples_at(cond, SPREAD_STATES, SPREAD_SAMPLES)
        metadata = {
            "actor_q": q.mean().detach(),
            "consistency_loss": consistency.mean().detach(),
            # a fill, not torch.as_tensor(float, device=...): no host-to-device copy
            "lambda_consistency": (weight.detach().to(q.dtype) if isinstance(weight, Tensor)
                                   else q.new_full((), weight)),
            "action_spread": action_spread(samples),
            "action_bound_frac": bound_fraction(unit_action.detach()),
            "preclip_beyond_frac": (unclipped.detach().abs() > 1).float().mean(),
        }
        return loss, metadata

    def teacher_loss(self, tensordict: TensorDictBase, features: torch.Tensor
                     ) -> tuple[torch.Tensor, dict]:
        """EDM denoising loss of the distillation teacher on replayed actions, on detached
        features (Karras et al. 2022; trains the teacher only)."""
        if self.teacher is None:
            raise ValueError("teacher_loss needs a distillation consistency_loss "
                             "(agent.consistency.loss=distillation); this loss has no teacher")
        per_sample, _ = self.denoising_loss(
            self.teacher, self.policy.to_unit(tensordict[self.tensor_keys.action]),
            features.detach())
        return per_sample.mean(), {}


class ConsistencyRegularizer(nn.Module):
    """CP3ER's sample-based entropy regulariser as a term for any actor loss.

    ``weight * mean L_c(a_replay, s)``: consistency training of the actor's denoiser on
    replayed actions (mapped back to ``[-1, 1]``), on the actor's detached input (it trains
    the actor only). Add it to e.g. ``TD3Loss.actor_loss`` (examples/td3_consistency_actor.py)
    or use :class:`ConsistencyRegularizedLoss`.

    Args:
        actor: a consistency actor (:func:`make_consistency_actor`); its first in_key is the
            conditioning input.
        weight: lambda (CP3ER: 0.05).
        consistency_loss: default ``ConsistencyTrainingLoss`` on the actor's schedule.
        action_key: where the batch holds the replayed actions.
    """

    def __init__(self, actor: TensorDictModule, weight: float = 0.05,
                 consistency_loss: ConsistencyTrainingLoss | None = None,
                 action_key: NestedKey = "action") -> None:
        super().__init__()
        if not isinstance(actor.module, ConsistencyPolicy):
            raise TypeError("ConsistencyRegularizer needs a consistency actor "
                            f"(make_consistency_actor), got {type(actor.module).__name__}")
        self.actor = actor
        self.weight = weight
        self.consistency_loss = consistency_loss or ConsistencyTrainingLoss(
            actor.module.denoiser.schedule)
        self.action_key = action_key

    def unweighted(self, tensordict: TensorDictBase) -> torch.Tensor:
        """``mean L_c(a_replay, s)`` (without ``weight``)."""
        policy = self.actor.module
        cond = tensordict[self.actor.in_keys[0]].detach()
        value, _ = self.consistency_loss(policy.denoiser,
                                         policy.to_unit(tensordict[self.action_key]), cond)
        return value.mean()

    def forward(self, tensordict: TensorDictBase) -> torch.Tensor:
        return self.weight * self.unweighted(tensordict)


class ConsistencyRegularizedLoss(LossModule):
    """A TorchRL actor-critic loss (``TD3Loss``, ``DDPGLoss``) plus CP3ER's regulariser.

    ``forward`` adds ``loss_consistency`` (``weight * mean L_c``; actor parameters only) and
    the unweighted metric ``consistency_loss`` to the wrapped loss's output;
    :meth:`consistency_loss` gives the term alone, for recipes that step the actor
    separately (TD3's delayed policy update). Both losses run under ``RANDOM`` (set on the
    wrapped one too): TorchRL's default ``DETERMINISTIC`` would train a ``zero_noise`` actor
    on ``D(0, sigma_max | s)`` only. Build the value estimator and ``SoftUpdate`` on the
    wrapped loss (it holds the targets). Example: docs/torchrl_actor.md.

    Args:
        loss: the wrapped ``LossModule``.
        actor: the consistency actor it trains (default ``loss.actor_network``).
        weight: lambda (CP3ER: 0.05).
        consistency_loss: as in :class:`ConsistencyRegularizer`.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import MLP, ValueOperator
        >>> from torchrl.objectives import TD3Loss
        >>> spec = Bounded(-2.0, 2.0, shape=(1,))
        >>> actor = make_consistency_actor(3, 1, in_key="observation", spec=spec,
        ...                                hidden_dim=32)
        >>> qvalue = ValueOperator(MLP(in_features=4, out_features=1, num_cells=[32]),
        ...                        in_keys=["observation", "action"])
        >>> loss = ConsistencyRegularizedLoss(TD3Loss(actor, qvalue, action_spec=spec))
        >>> batch = TensorDict({"observation": torch.randn(8, 3),
        ...     "action": torch.rand(8, 1) * 4 - 2,
        ...     "next": {"observation": torch.randn(8, 3), "reward": torch.randn(8, 1),
        ...              "done": torch.zeros(8, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(8, 1, dtype=torch.bool)}}, [8])
        >>> out = loss(batch)
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_consistency', 'loss_qvalue']
    """

    deterministic_sampling_mode = ExplorationType.RANDOM

    def __init__(self, loss: LossModule, actor: TensorDictModule | None = None, *,
                 weight: float = 0.05,
                 consistency_loss: ConsistencyTrainingLoss | None = None) -> None:
        super().__init__()
        actor = actor if actor is not None else getattr(loss, "actor_network", None)
        if actor is None:
            raise TypeError(f"{type(loss).__name__} has no actor_network: pass the "
                            "consistency actor as actor=")
        action_key = getattr(getattr(loss, "tensor_keys", None), "action", "action")
        self.loss_module = loss
        loss.deterministic_sampling_mode = ExplorationType.RANDOM
        self.regularizer = ConsistencyRegularizer(actor, weight, consistency_loss,
                                                  action_key=action_key)

    @property
    def in_keys(self) -> list[NestedKey]:
        return sorted({*self.loss_module.in_keys, self.regularizer.action_key,
                       *self.regularizer.actor.in_keys}, key=str)

    @property
    def out_keys(self) -> list[NestedKey]:
        return [*self.loss_module.out_keys, "loss_consistency"]

    def _forward_value_estimator_keys(self, **kwargs) -> None:  # the wrapped loss's own
        pass

    def consistency_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """``(weight * mean L_c, {"consistency_loss": mean L_c, detached})``."""
        unweighted = self.regularizer.unweighted(tensordict)
        return self.regularizer.weight * unweighted, {"consistency_loss": unweighted.detach()}

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        out = self.loss_module(tensordict)
        value, metadata = self.consistency_loss(tensordict)
        out.set("loss_consistency", value)
        for key, metric in metadata.items():
            out.set(key, metric)
        return out
