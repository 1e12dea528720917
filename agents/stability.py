"""Remedies for the collapse of CP3ER's one-step policy onto the action bounds
(docs/method.md, "The collapse and what the stable preset changes").

Each is a switch of ``agents.cp3er.CP3ERLoss`` / ``agents.agent.Agent`` (``agent.stability``
in ``configs/agent/cp3er.yaml``, all off by default: the paper's behaviour). This module
holds the pieces with arithmetic of their own:

- :func:`normalized_q_term`: the actor's Q term divided by its detached batch scale,
  ``-Q / mean|Q|`` (Fujimoto & Gu 2021, TD3+BC, eq. 3; Park et al. 2025, Flow Q-learning),
  so lambda weighs the regulariser against a term of order one whatever the return scale.
- :func:`bound_penalty`: ``mean relu(|u| - 1)^2`` of the one-step output ``u`` before the
  denoiser's clip, a gradient back into the box where the hard clamp has none.
- :class:`AdaptiveWeight`: lambda tuned by dual ascent to hold a target sample spread, as
  SAC tunes its temperature to a target entropy (Haarnoja et al. 2018, "Soft Actor-Critic
  Algorithms and Applications", eq. 18), the spread standing in for the entropy a
  consistency policy has no density for; or to hold the share of samples on the action
  bounds under a target (the collapse itself as the constraint).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["AdaptiveWeight", "bound_penalty", "normalized_q_term"]

#: :class:`AdaptiveWeight`: raise the weight when the statistic is below / above target.
RAISE_WHEN = ("below", "above")
#: ``mean|Q|`` below this is treated as this (a critic at initialisation predicts ~0).
Q_SCALE_FLOOR = 1e-3


def normalized_q_term(q: Tensor) -> tuple[Tensor, Tensor]:
    """``(-mean Q / stopgrad mean|Q|, mean|Q|)``: the actor's Q term on the scale of one
    (TD3+BC's ``lambda = alpha / mean|Q|`` with ``alpha`` = 1 on the Q side)."""
    scale = q.detach().abs().mean().clamp_min(Q_SCALE_FLOOR)
    return -q.mean() / scale, scale


def bound_penalty(unclipped: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """``mean_b sum_d relu(u - high)^2 + relu(low - u)^2``: zero inside the action box,
    quadratic in how far beyond it a pre-clip output ``u`` lies."""
    beyond = torch.relu(unclipped - high) + torch.relu(low - unclipped)
    return beyond.square().sum(-1).mean()


class AdaptiveWeight(nn.Module):
    """A positive weight tuned by dual ascent on its logarithm to hold a statistic at a
    target: ``log w <- clip(log w + lr (target - value) / target, log w_min, log w_max)``
    after each actor step (``raise_when="below"``: a spread under its target raises lambda,
    which pulls the one-step samples toward the spread of the replayed actions; a smaller
    one lets the Q term sharpen the policy), or with the sign flipped
    (``raise_when="above"``: a share of samples on the bounds above its target raises it).
    The step is relative to the target, so ``lr`` is the change of ``log w`` per update for
    a spread at 0 (collapsed): lr 0.01 multiplies the weight by e every 100 collapsed
    updates.

    The weight lives in a buffer (saved and restored with the loss's state dict; not a
    parameter of any optimiser).
    """

    log_weight: Tensor

    def __init__(self, initial: float, target: float, lr: float = 0.01,
                 minimum: float = 1e-3, maximum: float = 10.0,
                 raise_when: str = "below") -> None:
        super().__init__()
        if raise_when not in RAISE_WHEN:
            raise ValueError(f"raise_when must be one of {RAISE_WHEN}, got {raise_when!r}")
        self.sign = 1.0 if raise_when == "below" else -1.0
        if not 0 < minimum <= initial <= maximum:
            raise ValueError(f"adaptive weight: need 0 < minimum <= initial <= maximum, got "
                             f"minimum={minimum}, initial={initial}, maximum={maximum}")
        if target <= 0 or lr <= 0:
            raise ValueError(f"adaptive weight: target and lr must be > 0, got "
                             f"target={target}, lr={lr}")
        self.target, self.lr = float(target), float(lr)
        self.log_min, self.log_max = math.log(minimum), math.log(maximum)
        self.register_buffer("log_weight", torch.tensor(math.log(initial)))

    def extra_repr(self) -> str:
        return (f"target={self.target}, lr={self.lr}, minimum={math.exp(self.log_min):g}, "
                f"maximum={math.exp(self.log_max):g}, sign={self.sign:+g}")

    @property
    def value(self) -> Tensor:
        """The current weight (a detached 0-d tensor)."""
        return self.log_weight.exp()

    @torch.no_grad()
    def step(self, statistic: Tensor) -> None:
        """One dual-ascent step from the measured ``statistic`` (no host read)."""
        error = (self.target - statistic.detach().to(self.log_weight)) / self.target
        self.log_weight.add_(self.sign * self.lr * error).clamp_(self.log_min, self.log_max)
