"""DrQ-v2 random-shift augmentation (Yarats et al. 2021, arXiv 2107.09645).

DrQ-v2 replicate-pads by ``pad`` and crops back at a random offset with a bilinear
``grid_sample`` whose points fall on pixel centres: an exact integer shift. Here it is one
gather with clamped source indices (no padded copy, no interpolation, any dtype);
tests/test_augment.py checks it against DrQ-v2's version.

Shifts are ``(dy, dx)`` in ``[-pad, pad]``: output pixel ``(i, j)`` reads input pixel
``(clamp(i + dy, 0, H - 1), clamp(j + dx, 0, W - 1))``; DrQ-v2's crop offset is ``shift + pad``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RandomShift", "random_shift", "sample_shifts"]


def sample_shifts(
    num: int,
    pad: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[num, 2]`` integer ``(dy, dx)`` shifts, uniform in ``[-pad, pad]``. Without a
    generator drawn on ``device``: no host-to-device copy (a CUDA graph would capture it as
    a constant)."""
    draw_device = generator.device if generator is not None else device
    shifts = torch.randint(-pad, pad + 1, (num, 2), generator=generator, device=draw_device)
    return shifts.to(device) if device is not None else shifts


def _flatten_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    if x.dim() < 3:
        raise ValueError(f"expected images [*batch, C, H, W], got shape {tuple(x.shape)}")
    batch = x.shape[:-3]
    return x.reshape(-1, *x.shape[-3:]), batch


def _resolve_shifts(
    shifts: torch.Tensor | None,
    num: int,
    pad: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    if shifts is None:
        return sample_shifts(num, pad, generator, device)
    if shifts.numel() != 2 * num:
        raise ValueError(f"need one (dy, dx) pair per image ({num}), got {tuple(shifts.shape)}")
    return shifts.reshape(num, 2).to(device=device, dtype=torch.long)


def random_shift(
    x: torch.Tensor,
    pad: int = 4,
    generator: torch.Generator | None = None,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """DrQ-v2's random shift by integer indexing; keeps shape, dtype and channels-last.

    Args:
        x: images ``[*batch, C, H, W]``, uint8 included (augment before converting).
        pad: maximum shift in pixels.
        generator: for the shifts (ignored when ``shifts`` is given).
        shifts: ``(dy, dx)`` per image, ``[*batch, 2]`` or ``[N, 2]``.
    """
    images, batch = _flatten_batch(x)
    n, c, h, w = images.shape
    shifts = _resolve_shifts(shifts, n, pad, generator, images.device)
    rows = (torch.arange(h, device=images.device) + shifts[:, :1]).clamp_(0, h - 1)
    cols = (torch.arange(w, device=images.device) + shifts[:, 1:]).clamp_(0, w - 1)
    source = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, h * w)  # [N, H*W]
    if (
        images.dim() == 4
        and not images.is_contiguous()
        and images.is_contiguous(memory_format=torch.channels_last)
    ):
        # Pixels are rows of C values: copy whole pixels, keep the layout.
        flat = images.permute(0, 2, 3, 1).reshape(n * h * w, c)
        offset = torch.arange(n, device=images.device)[:, None] * (h * w)
        out = flat.index_select(0, (source + offset).reshape(-1))
        out = out.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        planes = images.reshape(n, c, h * w)
        out = planes.gather(2, source[:, None, :].expand(n, c, h * w)).view(n, c, h, w)
    return out.reshape(*batch, c, h, w)


class RandomShift(nn.Module):
    """:func:`random_shift` as a module; always active (applied to replay batches only)."""

    def __init__(self, pad: int = 4) -> None:
        super().__init__()
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.pad = pad

    def forward(
        self,
        x: torch.Tensor,
        shifts: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Shift every image by its own random (or given) ``(dy, dx)``."""
        return random_shift(x, self.pad, generator=generator, shifts=shifts)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"
