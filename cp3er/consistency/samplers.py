"""Consistency samplers, one signature: ``sampler(denoiser, cond, action_dim, *, ...,
generator=None)``; the batch shape is ``cond.shape[:-1]``."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import torch
from torch import Tensor

from cp3er.consistency.denoiser import (
    Denoiser,
    DenoiserFn,
    phased_map,
    schedule_of,
    unwrap,
)
from cp3er.consistency.ode import probability_flow_step
from cp3er.consistency.schedule import phase_edges

__all__ = [
    "ode_calls",
    "sample_multi_step",
    "sample_ode",
    "sample_one_step",
    "sample_one_step_unclipped",
    "sample_phased",
    "sample_zero_noise",
]


def _noise(
    cond: Tensor, action_dim: int, generator: torch.Generator | None
) -> Tensor:
    shape = (*cond.shape[:-1], action_dim)
    return torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)


def sample_one_step(
    denoiser: DenoiserFn,
    cond: Tensor,
    action_dim: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One-step consistency sampling, ``D(sigma_max z, sigma_max)`` (Song et al. 2023, alg. 1)."""
    sigma_max = schedule_of(denoiser).sigma_max
    return denoiser(sigma_max * _noise(cond, action_dim, generator), sigma_max, cond)


def sample_zero_noise(
    denoiser: DenoiserFn,
    cond: Tensor,
    action_dim: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``D(0, sigma_max)``: the one-step sampler at ``z = 0``, repeatable; not a sample."""
    sigma_max = schedule_of(denoiser).sigma_max
    shape = (*cond.shape[:-1], action_dim)
    zeros = torch.zeros(shape, device=cond.device, dtype=cond.dtype)
    return denoiser(zeros, sigma_max, cond)


def sample_one_step_unclipped(
    denoiser: Denoiser,
    cond: Tensor,
    action_dim: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`sample_one_step` before the action clip: for a penalty on samples beyond the
    box, where a hard clamp has no gradient."""
    sigma_max = schedule_of(denoiser).sigma_max
    noise = sigma_max * _noise(cond, action_dim, generator)
    return unwrap(denoiser).unclipped(noise, sigma_max, cond)


def sample_multi_step(
    denoiser: DenoiserFn,
    cond: Tensor,
    action_dim: int,
    *,
    num_steps: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, alg. 1).

    ``x <- D(x + sqrt(t^2 - sigma_min^2) z, t)`` at ``t = sigma_{k (N-1) // num_steps}``,
    ``k = 0..num_steps-1``, starting from ``D(sigma_max z, sigma_max)``.
    """
    schedule = schedule_of(denoiser)
    if not 1 <= num_steps <= schedule.num_steps - 1:
        raise ValueError(f"num_steps must be in [1, {schedule.num_steps - 1}], got {num_steps}")
    sigmas = schedule.sigmas(device=cond.device, dtype=cond.dtype)
    levels = [sigmas[k * (schedule.num_steps - 1) // num_steps] for k in range(num_steps)]
    x = denoiser(levels[0] * _noise(cond, action_dim, generator), levels[0], cond)
    for t in levels[1:]:
        scale = torch.sqrt(t**2 - schedule.sigma_min**2)
        x = denoiser(x + scale * _noise(cond, action_dim, generator), t, cond)
    return x


def sample_phased(
    denoiser: DenoiserFn,
    cond: Tensor,
    action_dim: int,
    *,
    num_phases: int = 4,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Phased consistency sampling (Wang et al. 2024, PCM): from ``x = sigma_max z``,
    ``x <- phased_map(D, x, sigma_{e_m} -> sigma_{e_{m+1}})``, no re-noising, then clipped."""
    schedule = schedule_of(denoiser)
    sigmas = schedule.sigmas(device=cond.device, dtype=cond.dtype)
    edges = phase_edges(schedule.num_steps, num_phases)
    x = sigmas[0] * _noise(cond, action_dim, generator)
    for upper, lower in itertools.pairwise(edges):
        x = phased_map(denoiser, x, sigmas[upper], sigmas[lower], cond)
    module = unwrap(denoiser)
    return module.apply_clip(x) if isinstance(module, Denoiser) else x


def sample_ode(
    denoiser: DenoiserFn,
    cond: Tensor,
    action_dim: int,
    *,
    num_steps: int = 18,
    solver: Literal["euler", "heun"] = "heun",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diffusion sampling by the probability-flow ODE (Karras et al. 2022, algorithm 1).

    :func:`probability_flow_step` along a ``num_steps``-point Karras grid, then ``D(x, t)``
    (Euler to 0); Heun: ``2 num_steps - 1`` calls (EDM: 18 steps, 35 calls). For a
    diffusion model (a distillation teacher), not a consistency model.
    """
    schedule = dataclasses.replace(schedule_of(denoiser), num_steps=num_steps)
    sigmas = schedule.sigmas(device=cond.device, dtype=cond.dtype)
    x = sigmas[0] * _noise(cond, action_dim, generator)
    for t, t_next in itertools.pairwise(sigmas):
        x = probability_flow_step(denoiser, x, t, t_next, cond, solver)
    return denoiser(x, sigmas[-1], cond)


def ode_calls(num_steps: int, solver: str) -> int:
    """Denoiser calls of :func:`sample_ode`: ``num_steps`` Euler or ``2 num_steps - 1`` Heun."""
    return 2 * num_steps - 1 if solver == "heun" else num_steps
