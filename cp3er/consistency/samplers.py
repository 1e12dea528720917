"""Consistency samplers, one signature: ``sampler(denoiser, cond, action_dim, *, ...,
generator=None)``; the batch shape is ``cond.shape[:-1]``."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from cp3er.consistency.denoiser import (
    Denoiser,
    DenoiserFn,
    phased_map,
    schedule_of,
    unwrap,
)
from cp3er.consistency.schedule import phase_edges

__all__ = ["sample_multi_step", "sample_one_step", "sample_phased"]


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


def sample_multi_step(
    denoiser: DenoiserFn,
    cond: Tensor,
    action_dim: int,
    *,
    num_steps: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling: denoise, re-noise, denoise (Song et al. 2023, alg. 1).

    ``x <- D(x + sqrt(t^2 - sigma_min^2) z, t)`` at the ``num_steps`` grid points
    ``sigma_{k (N-1) // num_steps}``, ``k = 0..num_steps-1`` (sigma_max first, where
    ``x = sigma_max z`` is denoised directly); ``num_steps = 1`` is one-step sampling.
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
    """Phased consistency sampling: M deterministic phase-edge jumps (Wang et al. 2024, PCM).

    ``x <- phased_map(D, x, sigma_{e_m} -> sigma_{e_{m+1}})`` for ``m = 0..M-1`` from
    ``x = sigma_max z``, no re-noising; the result is clipped like the denoiser's output.
    """
    schedule = schedule_of(denoiser)
    sigmas = schedule.sigmas(device=cond.device, dtype=cond.dtype)
    edges = phase_edges(schedule.num_steps, num_phases)
    x = sigmas[0] * _noise(cond, action_dim, generator)
    for upper, lower in itertools.pairwise(edges):
        x = phased_map(denoiser, x, sigmas[upper], sigmas[lower], cond)
    module = unwrap(denoiser)
    return module.apply_clip(x) if isinstance(module, Denoiser) else x
