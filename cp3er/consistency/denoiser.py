"""EDM preconditioning around a network, the phased map, and EMA targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cp3er.choices import CLIP_MODES
from cp3er.consistency.schedule import KarrasSchedule

__all__ = [
    "CLIP_MODES",
    "TIME_INPUT_SCALE",
    "Denoiser",
    "DenoiserFn",
    "batch_sigma",
    "ema_target",
    "ema_update",
    "phased_map",
    "schedule_of",
    "unclipped",
    "unwrap",
]

#: Anything called as ``fn(x, sigma, cond) -> Tensor`` (a :class:`Denoiser` or its EMA copy).
DenoiserFn = Callable[[Tensor, Tensor, Tensor], Tensor]

#: Scale of the network's noise input, ``c_noise(sigma) = 250 ln(sigma)`` (Song et al.
#: 2023's ``1000 * 0.25 ln(sigma)``; CP3ER / CPQL reference code).
TIME_INPUT_SCALE = 250.0


class Denoiser(nn.Module):
    """Consistency function ``D(x, sigma | cond)`` with EDM preconditioning.

    ``D = clip(c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 ln sigma, cond))``
    (Song et al. 2023; Karras et al. 2022, table 1). ``clip`` into ``[-1, 1]``: ``"clamp"``
    (the CP3ER reference; zero gradient when saturated), ``"straight_through"`` (identity
    gradient) or ``"none"`` (then ``D(x, sigma_min) = x`` for every ``x``, not only in the box).
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: KarrasSchedule | None = None,
        clip: Literal["clamp", "straight_through", "none"] = "clamp",
    ) -> None:
        super().__init__()
        if clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
        self.network = network
        self.schedule = schedule if schedule is not None else KarrasSchedule()
        self.clip = clip

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, clip={self.clip!r}"

    def apply_clip(self, x: Tensor) -> Tensor:
        """Map ``x`` into the action box according to ``self.clip``."""
        if self.clip == "clamp":
            return x.clamp(-1.0, 1.0)
        if self.clip == "straight_through":
            return x + (x.clamp(-1.0, 1.0) - x).detach()
        return x

    def unclipped(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        """``c_skip x + c_out F(c_in x, 250 ln sigma, cond)`` before the action clip."""
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, c_in = (c.unsqueeze(-1) for c in self.schedule.scalings(sigma))
        out = self.network(c_in * x, TIME_INPUT_SCALE * sigma.log(), cond)
        return c_skip * x + c_out * out

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        return self.apply_clip(self.unclipped(x, sigma, cond))


def batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Noise level(s) as a ``x.shape[:-1]`` tensor of ``x``'s dtype and device."""
    batch = x.shape[:-1]
    if not isinstance(sigma, Tensor):
        # a fill on x's device: torch.as_tensor(float, device=cuda) is a host-to-device copy,
        # which a CUDA graph capture refuses (perf.cuda_graph)
        return x.new_full(batch, float(sigma))
    sigma = sigma.to(dtype=x.dtype, device=x.device)
    if sigma.ndim == len(batch) + 1 and sigma.shape[-1] == 1:
        sigma = sigma.squeeze(-1)
    return sigma.expand(batch)


def phased_map(
    denoiser: DenoiserFn, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Tensor
) -> Tensor:
    """Phased consistency map from noise ``t`` to the phase edge ``s <= t`` (Wang et al. 2024).

    PCM's DDIM form: ``f(x, t -> s) = (s/t) x + (1 - s/t) D(x, t)``, so ``f(x, s -> s) = x``
    exactly for any ``D``.
    """
    t, s = batch_sigma(t, x), batch_sigma(s, x)
    ratio = (s / t).unsqueeze(-1)
    return ratio * x + (1.0 - ratio) * denoiser(x, t, cond)


def unwrap(denoiser: DenoiserFn) -> DenoiserFn:
    """The module inside an :func:`ema_target` copy, else ``denoiser`` itself."""
    return denoiser.module if isinstance(denoiser, AveragedModel) else denoiser


def unclipped(denoiser: DenoiserFn) -> DenoiserFn:
    """``denoiser`` (or its EMA copy) without its action clip: :meth:`Denoiser.unclipped`."""
    module = unwrap(denoiser)
    if not isinstance(module, Denoiser):
        raise TypeError(f"{type(denoiser).__name__} has no unclipped output (not a Denoiser)")
    return module.unclipped


def schedule_of(denoiser: DenoiserFn) -> KarrasSchedule:
    """The :class:`KarrasSchedule` a denoiser (or its EMA copy) carries as ``schedule``."""
    schedule = getattr(unwrap(denoiser), "schedule", None)
    if not isinstance(schedule, KarrasSchedule):
        raise ValueError(
            f"{type(denoiser).__name__} carries no KarrasSchedule `schedule`; pass one"
        )
    return schedule


def ema_target(denoiser: nn.Module, decay: float = 0.995) -> AveragedModel:
    """EMA copy of ``denoiser`` as a consistency target (Song et al.'s ``theta^-``;
    Consistency-AC uses 0.995): ``p_ema <- decay p_ema + (1 - decay) p``.

    An ``AveragedModel`` over parameters and buffers, gradients off, already initialised;
    move it with :func:`ema_update` after each optimiser step.
    """
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in denoiser.parameters()):
        raise ValueError("ema_target: the denoiser has a lazy layer not initialised yet "
                         "(cond_dim=None); call it once on a batch first, so the target "
                         "copies its weights")
    target = AveragedModel(
        denoiser, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
    )
    target.requires_grad_(False)
    target.update_parameters(denoiser)
    return target


@torch.no_grad()
def ema_update(target: AveragedModel, model: nn.Module) -> None:
    """``target.update_parameters(model)`` without its host read (``bool(n_averaged == 0)``,
    which a CUDA graph cannot capture); same arithmetic."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    averaged = [*target.module.parameters(), *target.module.buffers()]
    current = [*model.parameters(), *model.buffers()]
    for mine, theirs in zip(averaged, current, strict=True):
        key = (mine.device, mine.dtype)
        group = groups.setdefault(key, ([], []))
        group[0].append(mine.detach())
        group[1].append(theirs.detach().to(mine.device))
    for ema_tensors, model_tensors in groups.values():
        target.multi_avg_fn(ema_tensors, model_tensors, target.n_averaged)
    target.n_averaged += 1
