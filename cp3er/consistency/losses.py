"""Consistency training / distillation, CPQL reconstruction, phased consistency, EDM denoising.

One signature: ``loss(denoiser, actions, cond, *, target=None, generator=None) ->
(per_sample_loss (*batch,), metrics)``, metrics detached scalars
(``<prefix>_weighted``, ``_mse``, ``_sigma``: mean weighted loss, unweighted MSE, ``t``).
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
    """The schedule and the draw of ``i ~ U{0..N-2}``; ``schedule=None``: the denoiser's.

    Assignable, e.g. a growing ``num_steps`` for Consistency-AC.
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
    """``L = w(t) mean_d (D(x_t, t) - stopgrad D_target(x_t2, t2))^2`` on a pair at adjacent
    levels ``t = sigma_i > t2 = sigma_{i+1}`` (Song et al. 2023, algorithms 2 and 3).

    ``target=None``: the online denoiser under ``no_grad`` (CP3ER reference, no EMA); else
    e.g. an :func:`ema_target`. ``clip_outputs=False`` compares outputs before the action
    clip (a departure: docs/implementation.md, "Consistency loss before the clip").
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
        """``(x_t, x_t2, extra metrics)``."""
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

    One ``z ~ N(0, I)`` for both levels. ``"independent"``: ``x_t = a + t z``,
    ``x_t2 = a + t2 z``. ``"generator"`` (Issenhuth et al. 2024, "Improving Consistency
    Models with Generator-Induced Flows"): with probability ``mu`` (the paper's 50% mix)
    ``a`` is replaced by ``a_hat = stopgrad D_target(a + t z, t)`` (one extra forward pass);
    metric ``ct_gc_fraction``.
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

    ``x_t = a + t z``; ``x_t2 = x_t + (t2 - t) (x_t - D_teacher(x_t, t)) / t`` (Euler;
    ``"heun"`` adds the trapezoidal correction), then :class:`_PairLoss`. As Consistency
    Policy (Prasad et al. 2024). ``teacher`` is saved with the loss but trained elsewhere
    (:class:`DenoisingLoss`).
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
    Consistency Policy"): ``w(t) mean_d (D(a + t z, t) - a)^2``, ``t = sigma_i``.

    Trains ``D`` as the denoiser ``E[a | x_t]``: one-step samples regress toward the mean of
    the modes. ``target`` is ignored.
    """

    prefix = "recon"

    def _levels(
        self, denoiser: DenoiserFn, actions: Tensor, generator: torch.Generator | None
    ) -> tuple[KarrasSchedule, Tensor, Tensor]:
        """The schedule, noise levels ``t`` and noise ``z``."""
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
    """EDM denoising loss, e.g. for a distillation teacher (Karras et al. 2022, eq. 2, table 1).

    :class:`ReconstructionLoss` with ``ln t ~ N(p_mean, p_std^2)`` (EDM: -1.2, 1.2) clamped to
    ``[sigma_min, sigma_max]``; the "karras" weight is EDM's
    ``lambda(t) = (t^2 + sigma_data^2) / (t sigma_data)^2``. Sample with :func:`sample_ode`.
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

    For ``i`` in phase ``m`` (``e_m <= i < e_{m+1}``, :func:`phase_edges`) and its lower edge
    ``s = sigma_{e_{m+1}}``:
    ``L = w(t) mean_d (f(x_t, t -> s) - stopgrad f_target(x_t2, t2 -> s))^2``,
    ``f`` = :func:`phased_map`, independent coupling (no teacher). At ``t2 = s`` the target is
    ``x_t2`` itself, which anchors each phase. Sample with :func:`sample_phased`, same phases.
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
