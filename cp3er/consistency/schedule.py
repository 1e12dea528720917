"""Karras et al. (2022) noise grid, consistency-model scalings and loss weighting."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KarrasSchedule", "phase_edges"]


@dataclass(frozen=True)
class KarrasSchedule:
    """Karras et al. (2022) noise grid with the consistency-model boundary condition.

    ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0..N-1`` (EDM eq. 5, descending), scalings from Song et al. (2023,
    appendix C) and the "karras" loss weighting ``1/t^2 + 1/sigma_data^2``.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_steps: int = 40
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {self.num_steps}")
        if self.rho <= 0.0 or self.sigma_data <= 0.0:
            raise ValueError(
                f"rho and sigma_data must be positive, got {self.rho}, {self.sigma_data}"
            )

    def sigmas(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """The ``(num_steps,)`` grid, descending from sigma_max to sigma_min.

        Endpoints exact (the boundary condition holds bit-exactly). Cached per device and
        dtype and shared (do not write into it): no host-to-device copy per call, which a
        CUDA graph could not capture.
        """
        return _grid(self, torch.device(device if device is not None else "cpu"),
                     dtype or torch.get_default_dtype())

    def scalings(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Boundary-condition scalings ``(c_skip, c_out, c_in)``, shaped like ``t``.

        ``c_skip = sd^2 / ((t - sigma_min)^2 + sd^2)``,
        ``c_out = (t - sigma_min) sd / sqrt(t^2 + sd^2)``, ``c_in = 1 / sqrt(t^2 + sd^2)``,
        so ``D(x, sigma_min) = x`` exactly (Song et al. 2023, appendix C).
        """
        t = _as_float_tensor(t)
        sd2 = self.sigma_data**2
        shifted = t - self.sigma_min
        c_skip = sd2 / (shifted**2 + sd2)
        c_out = shifted * self.sigma_data / torch.sqrt(t**2 + sd2)
        c_in = torch.rsqrt(t**2 + sd2)
        return c_skip, c_out, c_in

    def loss_weight(self, t: Tensor | float) -> Tensor:
        """The "karras" weighting ``lambda(t) = 1/t^2 + 1/sigma_data^2`` (SNR + 1/sd^2)."""
        t = _as_float_tensor(t)
        return t.reciprocal() ** 2 + 1.0 / self.sigma_data**2


def _as_float_tensor(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def phase_edges(num_steps: int, num_phases: int) -> list[int]:
    """Grid indices of the ``M + 1`` phase edges, ``e_m = floor(m (N-1) / M)``.

    Phase ``m`` covers indices ``e_m..e_{m+1}``; e.g. N=40, M=4 -> [0, 9, 19, 29, 39].
    """
    if not 1 <= num_phases <= num_steps - 1:
        raise ValueError(
            f"num_phases must be in [1, {num_steps - 1}] for a {num_steps}-step grid, "
            f"got {num_phases}"
        )
    return [m * (num_steps - 1) // num_phases for m in range(num_phases + 1)]


@functools.lru_cache(maxsize=64)
def _grid(schedule: KarrasSchedule, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:meth:`KarrasSchedule.sigmas` (EDM eq. 5 in float64, exact endpoints)."""
    inv_rho = 1.0 / schedule.rho
    ramp = torch.linspace(0.0, 1.0, schedule.num_steps, dtype=torch.float64)
    hi, lo = schedule.sigma_max**inv_rho, schedule.sigma_min**inv_rho
    sigmas = (hi + ramp * (lo - hi)) ** schedule.rho
    sigmas[0], sigmas[-1] = schedule.sigma_max, schedule.sigma_min
    return sigmas.to(device=device, dtype=dtype)
