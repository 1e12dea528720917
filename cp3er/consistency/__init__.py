"""Consistency-model core shared by every consistency actor (overview: docs/api.md).

EDM / variance-exploding parameterization of consistency models (Song et al. 2023,
"Consistency Models"; Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"), conditioned on a state feature ``cond``:
``D(x, sigma | cond) = clip(c_skip x + c_out F(c_in x, 250 ln sigma, cond))``; the
preconditioning wraps the network (k-diffusion style), so ``F`` never sees the scalings.

Losses share ``loss(denoiser, actions, cond, *, target=None, generator=None) ->
(per_sample_loss, metrics)``; samplers ``sampler(denoiser, cond, action_dim, *, ...,
generator=None)``. Shapes: actions ``(*batch, action_dim)``, conditions ``(*batch,
cond_dim)`` (``cond_dim`` may be 0), noise levels a scalar, ``(*batch,)`` or ``(*batch, 1)``,
per-sample losses ``(*batch,)``. Import every public name from ``cp3er.consistency``.
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
