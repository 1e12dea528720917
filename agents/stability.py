"""Remedies for the collapse of CP3ER's one-step policy onto the action bounds: the pieces
with arithmetic of their own (``agent.stability``, all off by default; docs/method.md, "The
collapse onto the action bounds, and the remedies")."""

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
    """``(-mean Q / stopgrad mean|Q|, mean|Q|)``: the Q term on the scale of one, so lambda
    means the same at any return scale (TD3+BC, Fujimoto & Gu 2021, eq. 3, ``alpha`` = 1;
    Flow Q-learning, Park et al. 2025)."""
    scale = q.detach().abs().mean().clamp_min(Q_SCALE_FLOOR)
    return -q.mean() / scale, scale


def bound_penalty(unclipped: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """``mean_b sum_d relu(u - high)^2 + relu(low - u)^2`` of the pre-clip output ``u``: a
    gradient back into the box where the hard clamp has none."""
    beyond = torch.relu(unclipped - high) + torch.relu(low - unclipped)
    return beyond.square().sum(-1).mean()


class AdaptiveWeight(nn.Module):
    """A positive weight tuned by dual ascent on its logarithm to hold a statistic at a
    target, as SAC tunes its temperature (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms
    and Applications", eq. 18), the sample spread standing in for the entropy:
    ``log w <- clip(log w + sign lr (target - value) / target, log w_min, log w_max)``.
    ``raise_when="below"`` (a spread under target raises lambda) or ``"above"`` (a share on
    the bounds above target raises it). Relative to the target: at spread 0, lr 0.01
    multiplies the weight by e every 100 updates. A buffer, saved with the loss.
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
