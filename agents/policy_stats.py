"""Collapse diagnostics of a policy: its share on the action bounds and its sample spread.

A consistency policy has no density to read an entropy from; these are what CP3ER's
sample-based entropy regularisation (arXiv 2410.00051, section 4) should keep from
collapse (``action_spread`` ~ 0: one action per state; ``action_bound_frac`` ~ 1: on the
denoiser's clamp, where the gradient is zero).
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
    """``sqrt(mean over states and dimensions of the variance over K draws)`` (ddof=1) of
    ``samples [K >= 2, *states, action_dim]``: ``sigma`` of ``a = mu(s) + sigma z``."""
    if samples.shape[0] < 2:
        raise ValueError(f"action_spread needs K >= 2 samples per state, got {samples.shape[0]}")
    return samples.var(dim=0, unbiased=True).mean().sqrt()
