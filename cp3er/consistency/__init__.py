"""Consistency-model core shared by every consistency actor.

The parameterization is the EDM / Karras variance-exploding one used by consistency
models (Song et al. 2023, "Consistency Models", ICML; Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models", NeurIPS), conditioned on a state
feature ``cond``:

- :class:`KarrasSchedule`: the noise grid, the boundary-condition scalings and the loss
  weighting (docs/implementation.md, item 4).
- :class:`ConditionalMLP`: the network ``F`` of CP3ER / CPQL, an MLP on
  ``[x, time embedding, cond]``.
- :class:`Denoiser`: ``D(x, sigma | cond) = c_skip x + c_out F(c_in x, 250 ln sigma, cond)``,
  clipped to the action box ``[-1, 1]``. The preconditioning wraps the network
  (k-diffusion style), so ``F`` never sees ``sigma`` scalings.
- Losses, one signature ``loss(denoiser, actions, cond, *, target=None, generator=None)
  -> (per_sample_loss, metrics)``: :class:`ConsistencyTrainingLoss` (CP3ER / Consistency-AC,
  independent or generator-induced coupling), :class:`ConsistencyDistillationLoss` (a
  diffusion teacher's ODE step as the target, Song et al. 2023, alg. 2),
  :class:`ReconstructionLoss` (CPQL), :class:`PhasedConsistencyLoss` (phased consistency,
  Wang et al. 2024) and :class:`DenoisingLoss` (EDM, to train a diffusion teacher).
- Samplers, one signature ``sampler(denoiser, cond, action_dim, *, ..., generator=None)``:
  :func:`sample_one_step`, :func:`sample_multi_step`, :func:`sample_phased`,
  :func:`sample_zero_noise` (``D(0, sigma_max)``: a repeatable action, not a sample), and
  :func:`sample_ode` (a diffusion model's probability-flow ODE, Euler or Heun steps of
  :func:`probability_flow_step`).
- :func:`ema_target`: an exponential-moving-average copy of a denoiser to use as the
  consistency target (Consistency-AC, decay 0.995), moved by :func:`ema_update`.

Shapes: actions and noisy inputs are ``(*batch, action_dim)``, conditions
``(*batch, cond_dim)`` (``cond_dim`` may be 0 for an unconditional model), noise levels
a scalar, ``(*batch,)`` or ``(*batch, 1)``; per-sample losses are ``(*batch,)``.

Examples:
    >>> import torch
    >>> from cp3er.consistency import (
    ...     ConditionalMLP, ConsistencyTrainingLoss, Denoiser, sample_one_step)
    >>> denoiser = Denoiser(ConditionalMLP(action_dim=2, cond_dim=3, hidden_dim=32))
    >>> cond, actions = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    >>> per_sample, metrics = ConsistencyTrainingLoss()(denoiser, actions, cond)
    >>> per_sample.shape
    torch.Size([5])
    >>> sample_one_step(denoiser, cond, 2).shape
    torch.Size([5, 2])

Submodules: ``schedule`` (grid, scalings, weighting), ``network`` (``F``), ``denoiser``
(preconditioning, phased map, EMA target), ``ode`` (probability-flow ODE steps),
``losses``, ``samplers``; every public name is
re-exported here, import it from ``cp3er.consistency``.
"""

from __future__ import annotations

from cp3er.consistency.denoiser import (
    CLIP_MODES,
    TIME_INPUT_SCALE,
    Denoiser,
    DenoiserFn,
    batch_sigma,
    ema_target,
    ema_update,
    phased_map,
    schedule_of,
    unclipped,
    unwrap,
)
from cp3er.consistency.losses import (
    COUPLINGS,
    ConsistencyDistillationLoss,
    ConsistencyTrainingLoss,
    DenoisingLoss,
    PhasedConsistencyLoss,
    ReconstructionLoss,
)
from cp3er.consistency.network import (
    ConditionalMLP,
    ConstantsModule,
    ProjectedCondition,
    SinusoidalTimeEmbedding,
)
from cp3er.consistency.ode import ODE_SOLVERS, probability_flow_step
from cp3er.consistency.samplers import (
    ode_calls,
    sample_multi_step,
    sample_ode,
    sample_one_step,
    sample_one_step_unclipped,
    sample_phased,
    sample_zero_noise,
)
from cp3er.consistency.schedule import KarrasSchedule, phase_edges

__all__ = [
    "CLIP_MODES",
    "COUPLINGS",
    "ODE_SOLVERS",
    "TIME_INPUT_SCALE",
    "ConditionalMLP",
    "ConsistencyDistillationLoss",
    "ConsistencyTrainingLoss",
    "ConstantsModule",
    "Denoiser",
    "DenoiserFn",
    "DenoisingLoss",
    "KarrasSchedule",
    "PhasedConsistencyLoss",
    "ProjectedCondition",
    "ReconstructionLoss",
    "SinusoidalTimeEmbedding",
    "batch_sigma",
    "ema_target",
    "ema_update",
    "ode_calls",
    "phase_edges",
    "phased_map",
    "probability_flow_step",
    "sample_multi_step",
    "sample_ode",
    "sample_one_step",
    "sample_one_step_unclipped",
    "sample_phased",
    "sample_zero_noise",
    "schedule_of",
    "unclipped",
    "unwrap",
]
