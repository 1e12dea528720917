"""The probability-flow ODE of the EDM / variance-exploding diffusion and its solver steps."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from cp3er.choices import ODE_SOLVERS
from cp3er.consistency.denoiser import DenoiserFn, batch_sigma

__all__ = ["ODE_SOLVERS", "probability_flow_step"]


def probability_flow_step(
    denoiser: DenoiserFn,
    x: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    cond: Tensor,
    solver: Literal["euler", "heun"] = "euler",
) -> Tensor:
    """One step of the probability-flow ODE ``dx/dt = (x - D(x, t)) / t``, ``t -> t_next``.

    Karras et al. 2022, eq. 4 and algorithm 1 (the teacher step of Song et al. 2023, alg. 2):
    Euler ``x + (t_next - t) d(x, t)``; Heun ``x + (t_next - t) (d(x, t) + d(x', t_next)) / 2``
    with ``x'`` the Euler point (needs ``t_next > 0``). Euler to ``t_next = 0`` is ``D(x, t)``.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver must be one of {ODE_SOLVERS}, got {solver!r}")
    t, t_next = batch_sigma(t, x), batch_sigma(t_next, x)
    step = (t_next - t).unsqueeze(-1)
    slope = (x - denoiser(x, t, cond)) / t.unsqueeze(-1)
    euler = x + step * slope
    if solver == "euler":
        return euler
    slope_next = (euler - denoiser(euler, t_next, cond)) / t_next.unsqueeze(-1)
    return x + step * 0.5 * (slope + slope_next)
