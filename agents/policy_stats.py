"""Collapse diagnostics of a policy: how much of it sits on the action bounds, and how
widely a stochastic policy samples at fixed states.

A consistency policy has no density to read an entropy from; these two sample statistics
are what CP3ER's sample-based entropy regularisation (arXiv 2410.00051, section 4) is
meant to keep away from collapse: a policy that has collapsed onto one action per state
has ``action_spread`` ~ 0, and a policy pushed onto the clamp of the denoiser (its
gradient is zero there) has ``action_bound_frac`` ~ 1.
"""

from __future__ import annotations

import torch

__all__ = ["BOUND_TOLERANCE", "action_spread", "bound_fraction"]

#: An action entry within this distance of a bound counts as on the bound.
BOUND_TOLERANCE = 1e-3


def bound_fraction(actions: torch.Tensor, low: float = -1.0, high: float = 1.0,
                   tol: float = BOUND_TOLERANCE) -> torch.Tensor:
    """Fraction of the entries of ``actions`` within ``tol`` of ``low`` or ``high`` (a scalar
    tensor in [0, 1])."""
    at_bound = (actions <= low + tol) | (actions >= high - tol)
    return at_bound.float().mean()


def action_spread(samples: torch.Tensor) -> torch.Tensor:
    """Spread of a policy at fixed states from ``samples [K, *states, action_dim]``, ``K >= 2``
    draws at each state: ``sqrt(mean over states and dimensions of the sample variance
    over the K draws)`` (unbiased variance, ddof=1). For a policy ``a = mu(s) + sigma z``
    it estimates ``sigma``; 0 for a deterministic one."""
    if samples.shape[0] < 2:
        raise ValueError(f"action_spread needs K >= 2 samples per state, got {samples.shape[0]}")
    return samples.var(dim=0, unbiased=True).mean().sqrt()
