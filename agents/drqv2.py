"""DrQ-v2 (Yarats et al. 2021, arXiv 2107.09645) as TorchRL parts, the baseline beside CP3ER.

Encoder, augmentation, replay, loss base and training loop are shared with CP3ER
(docs/api.md). Its own parts follow its ``drqv2.py``: a ``Linear + LayerNorm + Tanh`` trunk
for actor and clipped double-Q critic, exploration noise ``linear(1.0, 0.1, N)`` (agent
steps), target policy smoothing ``a' = clamp(mu(s') + clip(sigma eps, -0.3, 0.3))`` (the
same sample in the actor loss ``-min(Q1, Q2)(s, a)``), orthogonal ``weight_init``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import TensorSpec
from torchrl.modules import MLP, AdditiveGaussianModule

from agents.actor_critic_loss import EncoderActorCriticLoss
from agents.encoder import weight_init
from agents.policy_stats import bound_fraction

__all__ = [
    "DoubleQCritic",
    "DrQV2Actor",
    "DrQV2Loss",
    "ScheduledGaussianNoise",
    "make_drqv2_actor",
    "smoothed_action",
]

#: DrQ-v2 keeps sampled actions this far inside [-1, 1] (``TruncatedNormal`` eps).
_BOUND_EPS = 1e-6


def _trunk(repr_dim: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


def _mlp(in_features: int, out_features: int, hidden_dim: int) -> MLP:
    return MLP(in_features=in_features, out_features=out_features,
               num_cells=[hidden_dim, hidden_dim], activation_class=nn.ReLU)


class DrQV2Actor(nn.Module):
    """``features -> tanh(policy(trunk(features)))``, the deterministic DrQ-v2 action mean."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int = 50,
                 hidden_dim: int = 1024) -> None:
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.policy = _mlp(feature_dim, action_dim, hidden_dim)
        self.apply(weight_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.policy(self.trunk(features)))


class DoubleQCritic(nn.Module):
    """DrQ-v2 critic: shared ``Linear + LayerNorm + Tanh`` trunk, two Q heads ``[*batch, 1]``."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int = 50,
                 hidden_dim: int = 1024) -> None:
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.q1 = _mlp(feature_dim + action_dim, 1, hidden_dim)
        self.q2 = _mlp(feature_dim + action_dim, 1, hidden_dim)
        self.apply(weight_init)

    def forward(self, features: torch.Tensor, action: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.trunk(features), action], dim=-1)
        return self.q1(h), self.q2(h)


class ScheduledGaussianNoise(AdditiveGaussianModule):
    """TorchRL's additive Gaussian exploration with DrQ-v2's exact linear schedule.

    ``sigma = init + (final - init) * min(steps / annealing_num_steps, 1)`` from a
    checkpointed agent-step count (``AdditiveGaussianModule.step`` subtracts a float32
    decrement per frame, which drifts over 5e5 steps). Noise under ``RANDOM`` only.
    """

    def __init__(self, spec: TensorSpec | None, sigma_init: float = 1.0, sigma_end: float = 0.1,
                 annealing_num_steps: int = 500_000, *, action_key: str = "action") -> None:
        if annealing_num_steps < 1:
            raise ValueError(f"annealing_num_steps must be >= 1, got {annealing_num_steps}")
        super().__init__(spec, float(sigma_init), float(sigma_end), annealing_num_steps,
                         action_key=action_key)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def step(self, frames: int = 1) -> None:
        self.steps += int(frames)
        mix = min(int(self.steps) / self.annealing_num_steps, 1.0)
        self.sigma.copy_(self.sigma_init + mix * (self.sigma_end - self.sigma_init))


def smoothed_action(mean: torch.Tensor, std: torch.Tensor | float, clip: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ-v2 ``TruncatedNormal(mean, std).sample(clip)``: ``mean + clip(std*eps, -c, c)``
    clamped to ``[-1 + 1e-6, 1 - 1e-6]``; the gradient w.r.t. ``mean`` is the identity
    (straight through the clamp, as DrQ-v2's ``_clamp``)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    x = mean + (eps * std).clamp(-clip, clip)
    clamped = x.clamp(-1.0 + _BOUND_EPS, 1.0 - _BOUND_EPS)
    return x - x.detach() + clamped.detach()


def make_drqv2_actor(repr_dim: int, action_dim: int, *, feature_dim: int = 50,
                     hidden_dim: int = 1024, in_key: str = "features",
                     out_key: str = "action") -> TensorDictModule:
    """The DrQ-v2 actor mean as a ``TensorDictModule`` ``in_key -> out_key``."""
    return TensorDictModule(DrQV2Actor(repr_dim, action_dim, feature_dim, hidden_dim),
                            in_keys=[in_key], out_keys=[out_key])


class DrQV2Loss(EncoderActorCriticLoss):
    """DrQ-v2 objective: clipped double-Q TD loss and ``-min Q`` actor loss.

    Critic: ``mse(Q1, y) + mse(Q2, y)``, ``y = r_n + discount * min(Q1', Q2')(s', a')``,
    ``a'`` smoothed. Actor: ``-mean min(Q1, Q2)(s, smoothed mu(s))``. ``sigma`` comes from
    ``exploration``, owned by the loss so its schedule position is saved with it.
    """

    critic: DoubleQCritic

    def __init__(self, encoder: TensorDictModule, actor: TensorDictModule,
                 critic: DoubleQCritic, exploration: ScheduledGaussianNoise, *,
                 stddev_clip: float = 0.3, augmentation: nn.Module | None = None) -> None:
        super().__init__(encoder, actor, critic, augmentation=augmentation)
        self.exploration = exploration
        self.stddev_clip = stddev_clip

    @property
    def mean_actor(self) -> nn.Module:
        return self.actor.module

    def _smoothed(self, mean_action: torch.Tensor) -> torch.Tensor:
        return smoothed_action(mean_action, self.exploration.sigma, self.stddev_clip)

    def critic_loss(self, tensordict: TensorDictBase, features: torch.Tensor,
                    next_features: torch.Tensor) -> tuple[torch.Tensor, dict]:
        action = tensordict[self.tensor_keys.action]
        with torch.no_grad():
            next_action = self._smoothed(self.mean_actor(next_features))
            with self.target_critic_params.to_module(self.critic):
                target_q1, target_q2 = self.critic(next_features, next_action)
            reward, discount = self.td_target_inputs(tensordict)
            target = reward + discount * torch.minimum(target_q1, target_q2)
        with self.critic_params.to_module(self.critic):
            q1, q2 = self.critic(features, action)
        loss = (q1 - target).square().mean() + (q2 - target).square().mean()
        metadata = {"q_mean": q1.mean().detach(), "target_mean": target.mean().detach(),
                    "stddev": self.exploration.sigma.detach().clone()}
        return loss, metadata

    def actor_loss(self, tensordict: TensorDictBase, features: torch.Tensor
                   ) -> tuple[torch.Tensor, dict]:
        features = features.detach()
        mean_action = self.mean_actor(features)
        action = self._smoothed(mean_action)
        with self.critic_params.detach().to_module(self.critic):
            q1, q2 = self.critic(features, action)
        q = torch.minimum(q1, q2)
        return -q.mean(), {"actor_q": q.mean().detach(),
                           "action_bound_frac": bound_fraction(mean_action.detach())}
