"""Consistency training and distillation, reconstruction (CPQL), phased consistency and
EDM denoising losses.

One signature: ``loss(denoiser, actions, cond, *, target=None, generator=None) ->
(per_sample_loss (*batch,), metrics)``, metrics being detached scalars.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from cp3er.choices import COUPLINGS
from cp3er.consistency.denoiser import DenoiserFn, phased_map, schedule_of, unclipped
from cp3er.consistency.ode import ODE_SOLVERS, probability_flow_step
from cp3er.consistency.schedule import KarrasSchedule, phase_edges

__all__ = [
    "COUPLINGS",
    "ConsistencyDistillationLoss",
    "ConsistencyTrainingLoss",
    "DenoisingLoss",
    "PhasedConsistencyLoss",
    "ReconstructionLoss",
]


class _GridLoss(nn.Module):
    """Shared parts of the losses: the schedule and the draw of ``i ~ U{0..N-2}``.

    ``schedule=None`` uses the denoiser's own ``schedule`` at call time; set it (or assign
    a new one, e.g. a growing ``num_steps`` for Consistency-AC) to use another grid.
    """

    prefix = "loss"

    def __init__(self, schedule: KarrasSchedule | None = None) -> None:
        super().__init__()
        self.schedule = schedule

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}"

    def _draw(
        self, denoiser: DenoiserFn, actions: Tensor, generator: torch.Generator | None
    ) -> tuple[KarrasSchedule, Tensor, Tensor, Tensor]:
        """Grid indices ``i`` (shape ``actions.shape[:-1]``), the grid, and noise ``z``."""
        schedule = self.schedule if self.schedule is not None else schedule_of(denoiser)
        sigmas = schedule.sigmas(device=actions.device, dtype=actions.dtype)
        index = torch.randint(
            0, schedule.num_steps - 1, actions.shape[:-1], generator=generator,
            device=actions.device,
        )
        z = torch.randn(
            actions.shape, generator=generator, device=actions.device, dtype=actions.dtype
        )
        return schedule, sigmas, index, z

    def _metrics(self, per_sample: Tensor, mse: Tensor, t: Tensor) -> dict[str, Tensor]:
        p = self.prefix
        return {
            f"{p}_weighted": per_sample.detach().mean(),
            f"{p}_mse": mse.detach().mean(),
            f"{p}_sigma": t.detach().mean(),
        }


class _PairLoss(_GridLoss):
    """Shared body of consistency training and distillation: a pair ``(x_t, x_t2)`` at
    adjacent grid levels ``t = sigma_i > t2 = sigma_{i+1}``, ``i ~ U{0..N-2}``, and

    ``L = w(t) * mean_d (D(x_t, t) - stopgrad D_target(x_t2, t2))^2``

    (Song et al. 2023, algorithms 2 and 3). The target is the online denoiser under
    ``torch.no_grad`` when ``target is None`` (CP3ER reference, no EMA), else the given
    module (e.g. :func:`ema_target`: Song et al.'s ``theta^-``, Consistency-AC). Subclasses
    build the pair in :meth:`_pair`.

    ``clip_outputs=False`` compares the denoisers' outputs *before* their action clip
    (:meth:`Denoiser.unclipped`; a departure, docs/implementation.md). With the reference's
    hard clamp an output pushed past +-1 gets no gradient from a clipped loss, so nothing
    pulls a policy that the Q-term drove onto the bound back into the box; the unclipped
    loss keeps pulling it towards consistency with the (in-box) replayed actions.
    """

    def __init__(self, schedule: KarrasSchedule | None = None, clip_outputs: bool = True) -> None:
        super().__init__(schedule)
        self.clip_outputs = clip_outputs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clip_outputs={self.clip_outputs}"

    def _pair(
        self, target_fn: DenoiserFn, actions: Tensor, cond: Tensor, t: Tensor, t2: Tensor,
        z: Tensor, generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(x_t, x_t2, extra metrics)`` from the actions, the levels and the noise."""
        raise NotImplementedError

    def forward(
        self,
        denoiser: DenoiserFn,
        actions: Tensor,
        cond: Tensor,
        *,
        target: DenoiserFn | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        schedule, sigmas, index, z = self._draw(denoiser, actions, generator)
        t, t2 = sigmas[index], sigmas[index + 1]
        target_fn = denoiser if target is None else target
        if not self.clip_outputs:
            denoiser, target_fn = unclipped(denoiser), unclipped(target_fn)
        x_t, x_t2, extra = self._pair(target_fn, actions, cond, t, t2, z, generator)
        prediction = denoiser(x_t, t, cond)
        with torch.no_grad():
            reference = target_fn(x_t2, t2, cond)
        mse = (prediction - reference).pow(2).mean(-1)
        per_sample = schedule.loss_weight(t) * mse
        return per_sample, {**self._metrics(per_sample, mse, t), **extra}


class ConsistencyTrainingLoss(_PairLoss):
    """Consistency-training loss on replay actions (Song et al. 2023, alg. 3; CP3ER).

    One ``z ~ N(0, I)`` for both levels; the target, weighting and ``clip_outputs`` as
    :class:`_PairLoss` (the loss of the pair below). Couplings of ``(x_t, x_t2)``:

    - ``"independent"``: ``x_t = a + t z``, ``x_t2 = a + t2 z``.
    - ``"generator"`` (Issenhuth et al. 2024, "Improving Consistency Models with
      Generator-Induced Flows"): ``a_hat = stopgrad D_target(a + t z, t)``, then
      ``x_t = a_hat + t z``, ``x_t2 = a_hat + t2 z`` with the same ``z``. Each sample uses
      this pair with probability ``mu`` and the independent pair otherwise (the paper's
      50% mix). Costs one extra no-grad forward pass.

    Metrics: ``ct_weighted`` (mean weighted loss), ``ct_mse`` (mean unweighted squared
    difference), ``ct_sigma`` (mean ``t``), and ``ct_gc_fraction`` (share of samples that
    used the generator-induced pair) with ``coupling="generator"``.
    """

    prefix = "ct"

    def __init__(
        self,
        schedule: KarrasSchedule | None = None,
        coupling: Literal["independent", "generator"] = "independent",
        mu: float = 0.5,
        clip_outputs: bool = True,
    ) -> None:
        super().__init__(schedule, clip_outputs)
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu must be in [0, 1], got {mu}")
        self.coupling, self.mu = coupling, mu

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coupling={self.coupling!r}, mu={self.mu}"

    def _pair(
        self, target_fn: DenoiserFn, actions: Tensor, cond: Tensor, t: Tensor, t2: Tensor,
        z: Tensor, generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        anchor, extra = actions, {}
        if self.coupling == "generator":
            use_gc = torch.rand(t.shape, generator=generator, device=actions.device)
            use_gc = use_gc < self.mu
            with torch.no_grad():
                a_hat = target_fn(actions + t.unsqueeze(-1) * z, t, cond)
            anchor = torch.where(use_gc.unsqueeze(-1), a_hat, actions)
            extra = {"ct_gc_fraction": use_gc.to(actions.dtype).mean()}
        return anchor + t.unsqueeze(-1) * z, anchor + t2.unsqueeze(-1) * z, extra


class ConsistencyDistillationLoss(_PairLoss):
    """Consistency distillation from a diffusion teacher (Song et al. 2023, alg. 2).

    ``x_t = a + t z`` on a replayed / data action ``a``; the teacher's probability-flow
    ODE step gives the target's input, ``x_t2 = x_t + (t2 - t) (x_t - D_teacher(x_t, t)) / t``
    (``solver="euler"``; ``"heun"`` adds the trapezoidal correction,
    :func:`probability_flow_step`), without gradient. Then the loss of :class:`_PairLoss`:
    ``w(t) mean_d (D(x_t, t) - stopgrad D_target(x_t2, t2))^2``, target the online student
    under no_grad or an :func:`ema_target` copy passed as ``target`` (Song et al. use an EMA
    ``theta^-``). Consistency Policy (Prasad et al. 2024) distils a diffusion policy this way.
    Unlike consistency training, the pair lies on (an approximation of) the teacher's ODE
    trajectory rather than on a one-sample estimate of it.

    ``teacher`` is a registered submodule (saved with the loss's state dict) but never
    trained here: train it with :class:`DenoisingLoss`. Costs one (Euler) or two (Heun)
    no-grad teacher calls. Metrics: ``cd_weighted``, ``cd_mse``, ``cd_sigma``.
    """

    prefix = "cd"

    def __init__(
        self,
        teacher: nn.Module,
        solver: Literal["euler", "heun"] = "euler",
        schedule: KarrasSchedule | None = None,
        clip_outputs: bool = True,
    ) -> None:
        super().__init__(schedule, clip_outputs)
        if solver not in ODE_SOLVERS:
            raise ValueError(f"solver must be one of {ODE_SOLVERS}, got {solver!r}")
        self.teacher, self.solver = teacher, solver

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, solver={self.solver!r}"

    def _pair(
        self, target_fn: DenoiserFn, actions: Tensor, cond: Tensor, t: Tensor, t2: Tensor,
        z: Tensor, generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        x_t = actions + t.unsqueeze(-1) * z
        with torch.no_grad():
            x_t2 = probability_flow_step(self.teacher, x_t, t, t2, cond, self.solver)
        return x_t, x_t2, {}


class ReconstructionLoss(_GridLoss):
    """CPQL behaviour loss (Chen et al. 2024, "Boosting Continuous Control with
    Consistency Policy"): ``w(t) * mean_d (D(a + t z, t) - a)^2``.

    ``t = sigma_i``, ``i ~ U{0..N-2}``. It trains ``D`` as the EDM denoiser
    ``E[a | x_t]``, so one-step samples regress toward the mean of the modes; ``target``
    is accepted for the common signature and ignored. Metrics: ``recon_weighted``,
    ``recon_mse``, ``recon_sigma``.
    """

    prefix = "recon"

    def _levels(
        self, denoiser: DenoiserFn, actions: Tensor, generator: torch.Generator | None
    ) -> tuple[KarrasSchedule, Tensor, Tensor]:
        """The schedule, noise levels ``t`` (``actions.shape[:-1]``) and noise ``z``."""
        schedule, sigmas, index, z = self._draw(denoiser, actions, generator)
        return schedule, sigmas[index], z

    def forward(
        self,
        denoiser: DenoiserFn,
        actions: Tensor,
        cond: Tensor,
        *,
        target: DenoiserFn | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        del target  # no target network: the data point is the target
        schedule, t, z = self._levels(denoiser, actions, generator)
        prediction = denoiser(actions + t.unsqueeze(-1) * z, t, cond)
        mse = (prediction - actions).pow(2).mean(-1)
        per_sample = schedule.loss_weight(t) * mse
        return per_sample, self._metrics(per_sample, mse, t)


class DenoisingLoss(ReconstructionLoss):
    """EDM denoising loss to train a diffusion model, e.g. a distillation teacher
    (Karras et al. 2022, eq. 2 and table 1, "EDM" column).

    ``ln t ~ N(p_mean, p_std^2)`` (EDM: -1.2, 1.2), clamped to the schedule's
    ``[sigma_min, sigma_max]``, instead of :class:`ReconstructionLoss`'s grid levels; the
    same ``lambda(t) (D(a + t z, t) - a)^2`` otherwise, whose "karras" weight
    ``1/t^2 + 1/sigma_data^2`` is EDM's ``lambda(t) = (t^2 + sigma_data^2) / (t sigma_data)^2``.
    Its minimiser is the ideal denoiser ``E[a | a + t z]`` at every ``t``, which
    :func:`sample_ode` integrates. Metrics: ``denoise_weighted``, ``denoise_mse``,
    ``denoise_sigma``.
    """

    prefix = "denoise"

    def __init__(
        self, schedule: KarrasSchedule | None = None, p_mean: float = -1.2, p_std: float = 1.2
    ) -> None:
        super().__init__(schedule)
        if p_std <= 0.0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p_mean={self.p_mean}, p_std={self.p_std}"

    def _levels(
        self, denoiser: DenoiserFn, actions: Tensor, generator: torch.Generator | None
    ) -> tuple[KarrasSchedule, Tensor, Tensor]:
        schedule = self.schedule if self.schedule is not None else schedule_of(denoiser)
        kwargs = {"generator": generator, "device": actions.device, "dtype": actions.dtype}
        log_t = torch.randn(actions.shape[:-1], **kwargs) * self.p_std + self.p_mean
        t = log_t.exp().clamp(schedule.sigma_min, schedule.sigma_max)
        return schedule, t, torch.randn(actions.shape, **kwargs)


class PhasedConsistencyLoss(_GridLoss):
    """Phased consistency training (Wang et al. 2024, "Phased Consistency Models").

    The grid is split into ``num_phases`` phases at :func:`phase_edges`. For
    ``i ~ U{0..N-2}`` in phase ``m`` (``e_m <= i < e_{m+1}``), ``t = sigma_i``,
    ``t2 = sigma_{i+1}`` and the phase's lower edge ``s = sigma_{e_{m+1}} <= t2``:

    ``L = w(t) * mean_d (f(x_t, t -> s) - stopgrad f_target(x_t2, t2 -> s))^2``

    with ``x_t = a + t z``, ``x_t2 = a + t2 z`` (independent coupling, consistency
    *training*: no teacher ODE solver) and ``f`` = :func:`phased_map`. When ``t2 = s`` the
    target is ``x_t2`` itself (the phase boundary condition), which anchors every phase the
    way ``sigma_min`` anchors plain consistency training. Weighting ``w(t)`` is the
    schedule's "karras" weight, as in the other losses. Sample with :func:`sample_phased`
    and the same ``num_phases``. Metrics: ``pc_weighted``, ``pc_mse``, ``pc_sigma``.
    """

    prefix = "pc"

    def __init__(self, schedule: KarrasSchedule | None = None, num_phases: int = 4) -> None:
        super().__init__(schedule)
        if num_phases < 1:
            raise ValueError(f"num_phases must be >= 1, got {num_phases}")
        self.num_phases = num_phases

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_phases={self.num_phases}"

    def forward(
        self,
        denoiser: DenoiserFn,
        actions: Tensor,
        cond: Tensor,
        *,
        target: DenoiserFn | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        schedule, sigmas, index, z = self._draw(denoiser, actions, generator)
        edges = torch.tensor(
            phase_edges(schedule.num_steps, self.num_phases), device=actions.device
        )
        lower = edges[torch.searchsorted(edges, index, right=True)]
        t, t2, s = sigmas[index], sigmas[index + 1], sigmas[lower]
        target_fn = denoiser if target is None else target
        prediction = phased_map(denoiser, actions + t.unsqueeze(-1) * z, t, s, cond)
        with torch.no_grad():
            reference = phased_map(target_fn, actions + t2.unsqueeze(-1) * z, t2, s, cond)
        mse = (prediction - reference).pow(2).mean(-1)
        per_sample = schedule.loss_weight(t) * mse
        return per_sample, self._metrics(per_sample, mse, t)
