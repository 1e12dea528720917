"""The CP3ER agent as TorchRL parts: a consistency actor module and a LossModule.

CP3ER (Li et al., NeurIPS 2024, arXiv 2410.00051): a consistency-model policy
sampled in one step, a mixture-of-Gaussians critic, and the actor objective
``-Q(s, pi(s)) + lambda * L_c(a ~ replay, s)`` where the consistency-training loss
on replayed actions is the sample-based entropy regulariser (docs/implementation.md, item 5).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictSequential
from tensordict.utils import NestedKey
from torch import nn
from torchrl.envs.utils import ExplorationType, exploration_type

from agents.actor_critic_loss import EncoderActorCriticLoss
from agents.critic import MoGCritic, mog_log_prob, mog_mean
from agents.policy_stats import action_spread, bound_fraction
from agents.stability import AdaptiveWeight, bound_penalty, normalized_q_term
from cp3er.consistency import (
    ConditionalMLP,
    ConsistencyTrainingLoss,
    Denoiser,
    DenoisingLoss,
    KarrasSchedule,
    ProjectedCondition,
    ema_target,
    ema_update,
    sample_one_step,
    sample_one_step_unclipped,
)

#: States of a batch (its first ones) and draws per state of the ``action_spread`` metric.
SPREAD_STATES, SPREAD_SAMPLES = 16, 4


class ConsistencyPolicy(nn.Module):
    """``features -> action``: one-step consistency sampling ``a = D(80 z, 80 | s)``.

    The noise is drawn inside ``forward``, so the module is a stochastic actor that
    TorchRL objectives (``TD3Loss``, ``DDPGLoss``) can call like any deterministic one;
    gradients flow through the denoiser (one-step sampling, docs/implementation.md, item 4).
    """

    def __init__(self, denoiser: Denoiser, action_dim: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.action_dim = action_dim

    def forward(self, features: torch.Tensor | ProjectedCondition) -> torch.Tensor:
        return sample_one_step(self.denoiser, features, self.action_dim)

    def condition(self, features: torch.Tensor) -> torch.Tensor | ProjectedCondition:
        """``features`` projected once through the network's first layer when it supports
        it (:class:`ConditionalMLP`), for several calls on the same states."""
        project = getattr(self.denoiser.network, "project", None)
        return features if project is None else project(features)

    @torch.no_grad()
    def samples_at(self, cond: torch.Tensor | ProjectedCondition, num_states: int,
                   num_samples: int) -> torch.Tensor:
        """``num_samples`` one-step actions at each of the first ``num_states`` states of
        ``cond``: ``[num_samples, num_states, action_dim]`` (no gradient). The states'
        projection is computed once and broadcast over the draws."""
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


def make_consistency_actor(
    repr_dim: int,
    action_dim: int,
    *,
    in_key: NestedKey = "features",
    out_key: NestedKey = "action",
    **denoiser: Any,
) -> TensorDictModule:
    """The CP3ER actor as a ``TensorDictModule`` reading ``in_key`` and writing ``out_key``.

    ``denoiser``: the keywords of :func:`make_denoiser` (``hidden_dim``, ``num_layers``,
    ``trunk_dim``, ``schedule``, ``clip``). With ``trunk_dim=None`` the MLP reads the raw
    encoder output (the reference: 39,200 features for pixels, ~42M parameters); an int
    adds the Linear+LayerNorm+Tanh trunk.
    """
    return TensorDictModule(
        ConsistencyPolicy(make_denoiser(repr_dim, action_dim, **denoiser), action_dim),
        in_keys=[in_key], out_keys=[out_key],
    )


def make_denoiser(
    repr_dim: int,
    action_dim: int,
    *,
    hidden_dim: int = 1024,
    num_layers: int = 3,
    trunk_dim: int | None = None,
    schedule: KarrasSchedule | None = None,
    clip: str = "clamp",
) -> Denoiser:
    """``D(x, t | features)``: the actor's network (a :class:`ConditionalMLP`) in the EDM
    preconditioning; also the diffusion teacher of ``agent.consistency.loss=distillation``."""
    network = ConditionalMLP(action_dim, repr_dim, hidden_dim, num_layers, trunk_dim=trunk_dim)
    return Denoiser(network, schedule or KarrasSchedule(), clip=clip)


def make_policy(encoder: TensorDictModule, actor: TensorDictModule) -> TensorDictSequential:
    """Observation -> features -> action, the module a collector or evaluator runs."""
    return TensorDictSequential(encoder, actor)


class QSelectedPolicy(nn.Module):
    """``features -> action``: ``num_candidates`` one-step samples per state, one of them
    chosen by ``softmax(Q / temperature)`` over the candidates (CPQL's online action
    selection, Chen et al. 2024), or the best one under ``ExplorationType.DETERMINISTIC``
    (evaluation). Q is the mixture mean of the loss's current critic. Acting only: the
    actor's training objective is unchanged (``agent.stability.act_candidates``).

    The loss is held by reference, not registered: the actor's and the critic's weights
    are saved with the loss, and this module adds no state of its own.
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
        expanded = features.expand(self.num_candidates, *features.shape)
        candidates = loss.policy(expanded)  # [N, *batch, action_dim]
        with loss.critic_params.to_module(loss.critic):
            q = loss.critic.mean(expanded, candidates).squeeze(-1)  # [N, *batch]
        if exploration_type() == ExplorationType.DETERMINISTIC:
            choice = q.argmax(0)
        else:
            logits = (q / self.temperature).movedim(0, -1)
            choice = torch.distributions.Categorical(logits=logits).sample()
        index = choice.unsqueeze(0).unsqueeze(-1).expand(1, *candidates.shape[1:])
        return candidates.gather(0, index).squeeze(0)


class CP3ERLoss(EncoderActorCriticLoss):
    """CP3ER objective: MoG critic NLL and ``-Q + lambda * L_c`` actor loss.

    Reads a replay batch with n-step targets already folded in (``cp3er.replay``):
    ``observation`` (pixels uint8 or states), ``action``, ``("next", observation)``,
    ``("next", "reward")`` (n-step discounted sum) and ``("next", "discount")``
    (``gamma^n'`` times non-termination: terminations cut bootstrapping, time-limit
    truncations do not).

    * Critic (docs/implementation.md, item 6): ``y = r_n + discount * q``, ``q`` =
      ``target_samples`` draws from the *target* mixture at ``(s', a')``, ``a'`` = one-step
      sample of the current actor at ``s'``; loss ``-mean log p_online(y | s, a)``. Trains
      the critic and the encoder.
    * Actor (docs/implementation.md, item 5): features detached, critic parameters detached;
      ``-mean Q(s, pi(s)) + lambda * mean L_c(a_replay, s)``. Trains the actor only.
      ``L_c`` is ``consistency_loss`` (any loss of the core's signature; default consistency
      training). Remedies for the policy's collapse onto the bounds (``agents.stability``,
      docs/method.md; all off by default, the paper's objective):
      ``normalize_q`` divides the Q term by its detached batch scale (``-Q / mean|Q|``);
      ``bound_penalty`` adds ``beta * mean relu(|u| - 1)^2`` of the one-step output ``u``
      before the clip; ``adaptive_lambda`` replaces the fixed lambda by an
      :class:`~agents.stability.AdaptiveWeight` that holds ``adaptive_statistic``
      (``action_spread`` at a target, or ``action_bound_frac`` under one), stepped by
      :meth:`after_actor_step`.
    * Teacher (only when ``consistency_loss`` has a ``teacher``: a
      :class:`~cp3er.consistency.ConsistencyDistillationLoss`): :meth:`teacher_loss`, the EDM
      denoising loss (:class:`~cp3er.consistency.DenoisingLoss`) of the diffusion teacher on
      replayed actions, conditioned on the same detached features. Trains the teacher only;
      the actor loss calls the teacher without gradient.
      With ``share_condition`` (default) the states' term of the actor's first layer is
      computed once for all actor calls on ``s`` (:class:`ProjectedCondition`; same
      values and gradients, one 39,200-wide matmul instead of four).

    ``forward`` returns every loss and the detached metrics; :meth:`critic_loss`,
    :meth:`actor_loss` (and :meth:`teacher_loss`) take the batch's features as arguments and
    return ``(loss, metadata)`` for the drqv2-style sequential update of
    :meth:`agents.agent.Agent.update` (critic step, then actor step with the updated critic;
    the reference's order).

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
        # The consistency target: the online denoiser under no_grad (None: the reference),
        # or an EMA copy theta^- (Song et al. 2023), moved by update_ema() after each
        # actor step.
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
            next_action = self.policy(next_features)
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
        """``-mean Q(s, pi(s)) + lambda * mean L_c(a_replay, s)`` on detached features (with
        the class docstring's remedies when they are switched on)."""
        keys = self.tensor_keys
        features = features.detach()
        cond = self.policy.condition(features) if self.share_condition else features
        denoiser = self.policy.denoiser
        # = self.policy(cond), the same draw: kept before the clip for the bound penalty
        unclipped = sample_one_step_unclipped(denoiser, cond, self.policy.action_dim)
        action = denoiser.apply_clip(unclipped)
        with self.critic_params.detach().to_module(self.critic):
            q = self.critic.mean(features, action)
        consistency, _ = self.consistency_loss(
            denoiser, tensordict[keys.action], cond, target=self.ema_denoiser
        )
        q_term = normalized_q_term(q)[0] if self.normalize_q else -q.mean()
        weight = self.consistency_weight
        loss = q_term + weight * consistency.mean()
        if self.bound_penalty > 0:
            loss = loss + self.bound_penalty * bound_penalty(unclipped)
        samples = self.policy.samples_at(cond, SPREAD_STATES, SPREAD_SAMPLES)
        metadata = {
            "actor_q": q.mean().detach(),
            "consistency_loss": consistency.mean().detach(),
            "lambda_consistency": torch.as_tensor(weight, dtype=q.dtype,
                                                  device=q.device).detach(),
            "action_spread": action_spread(samples),
            "action_bound_frac": bound_fraction(action.detach()),
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
            self.teacher, tensordict[self.tensor_keys.action], features.detach()
        )
        return per_sample.mean(), {}


class ConsistencyRegularizer(nn.Module):
    """CP3ER's sample-based entropy regulariser as a term for *any* actor loss.

    ``weight * mean L_c(a_replay, s)`` (docs/implementation.md, item 5): the
    consistency-training loss of the actor's denoiser on replayed actions, conditioned on
    the actor's input. Add it to another objective's actor loss, e.g. TorchRL's ``TD3Loss``::

        td3 = TD3Loss(actor, qvalue, action_spec=spec)
        regularizer = ConsistencyRegularizer(actor, weight=0.05)
        out = td3(batch)
        (out["loss_actor"] + regularizer(batch)).backward()

    Args:
        actor: the consistency actor, a ``TensorDictModule`` wrapping a
            :class:`ConsistencyPolicy` (``make_consistency_actor``); its first in_key is the
            conditioning input read from the batch (features or the observation itself).
        weight: lambda (CP3ER: 0.05).
        consistency_loss: the loss to use (default: ``ConsistencyTrainingLoss`` on the
            actor's schedule, independent coupling).
        action_key: where the replayed actions are in the batch.

    The conditioning input is detached: the regulariser trains the actor only.
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

    def forward(self, tensordict: TensorDictBase) -> torch.Tensor:
        cond = tensordict[self.actor.in_keys[0]].detach()
        value, _ = self.consistency_loss(self.actor.module.denoiser,
                                         tensordict[self.action_key], cond)
        return self.weight * value.mean()
