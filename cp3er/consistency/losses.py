"""Consistency-training, reconstruction (CPQL) and phased consistency losses.

One signature: ``loss(denoiser, actions, cond, *, target=None, generator=None) ->
(per_sample_loss (*batch,), metrics)``, metrics being detached scalars.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from cp3er.consistency.denoiser import DenoiserFn, phased_map, schedule_of, unclipped
from cp3er.consistency.schedule import KarrasSchedule, phase_edges

__all__ = [
    "COUPLINGS",
    "ConsistencyTrainingLoss",
    "PhasedConsistencyLoss",
    "ReconstructionLoss",
]

COUPLINGS = ("independent", "generator")


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


class ConsistencyTrainingLoss(_GridLoss):
    """Consistency-training loss on replay actions (Song et al. 2023, alg. 3; CP3ER).

    ``i ~ U{0..N-2}``, ``t = sigma_i``, ``t2 = sigma_{i+1} < t``, one ``z ~ N(0, I)``:
    ``L = w(t) * mean_d (D(x_t, t) - stopgrad D_target(x_t2, t2))^2``. The target is the
    online denoiser under ``torch.no_grad`` when ``target is None`` (CP3ER reference, no
    EMA), else the given module (e.g. :func:`ema_target`, Consistency-AC).

    Couplings of ``(x_t, x_t2)``:

    - ``"independent"``: ``x_t = a + t z``, ``x_t2 = a + t2 z``.
    - ``"generator"`` (Issenhuth et al. 2024, "Improving Consistency Models with
      Generator-Induced Flows"): ``a_hat = stopgrad D_target(a + t z, t)``, then
      ``x_t = a_hat + t z``, ``x_t2 = a_hat + t2 z`` with the same ``z``. Each sample uses
      this pair with probability ``mu`` and the independent pair otherwise (the paper's
      50% mix). Costs one extra no-grad forward pass.

    ``clip_outputs=False`` compares the denoisers' outputs *before* their action clip
    (:meth:`Denoiser.unclipped`; a departure, docs/implementation.md). With the reference's
    hard clamp an output pushed past +-1 gets no gradient from a clipped loss, so nothing
    pulls a policy that the Q-term drove onto the bound back into the box; the unclipped
    loss keeps pulling it towards consistency with the (in-box) replayed actions.

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
        super().__init__(schedule)
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu must be in [0, 1], got {mu}")
        self.coupling, self.mu = coupling, mu
        self.clip_outputs = clip_outputs

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, coupling={self.coupling!r}, mu={self.mu}, "
                f"clip_outputs={self.clip_outputs}")

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
        anchor, extra = actions, {}
        if self.coupling == "generator":
            use_gc = torch.rand(index.shape, generator=generator, device=actions.device)
            use_gc = use_gc < self.mu
            with torch.no_grad():
                a_hat = target_fn(actions + t.unsqueeze(-1) * z, t, cond)
            anchor = torch.where(use_gc.unsqueeze(-1), a_hat, actions)
            extra = {"ct_gc_fraction": use_gc.to(actions.dtype).mean()}
        prediction = denoiser(anchor + t.unsqueeze(-1) * z, t, cond)
        with torch.no_grad():
            reference = target_fn(anchor + t2.unsqueeze(-1) * z, t2, cond)
        mse = (prediction - reference).pow(2).mean(-1)
        per_sample = schedule.loss_weight(t) * mse
        return per_sample, {**self._metrics(per_sample, mse, t), **extra}


class ReconstructionLoss(_GridLoss):
    """CPQL behaviour loss (Chen et al. 2024, "Boosting Continuous Control with
    Consistency Policy"): ``w(t) * mean_d (D(a + t z, t) - a)^2``.

    ``t = sigma_i``, ``i ~ U{0..N-2}``. It trains ``D`` as the EDM denoiser
    ``E[a | x_t]``, so one-step samples regress toward the mean of the modes; ``target``
    is accepted for the common signature and ignored. Metrics: ``recon_weighted``,
    ``recon_mse``, ``recon_sigma``.
    """

    prefix = "recon"

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
        schedule, sigmas, index, z = self._draw(denoiser, actions, generator)
        t = sigmas[index]
        prediction = denoiser(actions + t.unsqueeze(-1) * z, t, cond)
        mse = (prediction - actions).pow(2).mean(-1)
        per_sample = schedule.loss_weight(t) * mse
        return per_sample, self._metrics(per_sample, mse, t)


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
