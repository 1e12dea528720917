"""Tests for the DrQ-v2 random-shift augmentation (agents/augment.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agents.augment import (
    RandomShift,
    _flatten_batch,
    _resolve_shifts,
    random_shift,
    sample_shifts,
)

PAD = 4


def random_shift_grid_sample(
    x: torch.Tensor,
    pad: int = 4,
    generator: torch.Generator | None = None,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """DrQ-v2's random shift: replicate pad, then bilinear ``grid_sample`` at integer offsets.

    The reference formulation (DrQ-v2 ``RandomShiftsAug``), generalised to
    non-square images: what :func:`random_shift` is checked against; float only
    (integer input is converted to float32).

    Args:
        x: images ``[*batch, C, H, W]``.
        pad: replicate padding / maximum shift in pixels.
        generator: random generator for the shifts (ignored when ``shifts`` is given).
        shifts: optional ``(dy, dx)`` integer shifts ``[*batch, 2]`` (or ``[N, 2]``).

    Returns:
        the shifted images as floats, same shape as ``x``.
    """
    images, batch = _flatten_batch(x)
    if not images.is_floating_point():
        images = images.float()
    n, c, h, w = images.shape
    shifts = _resolve_shifts(shifts, n, pad, generator, images.device)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    hp, wp = h + 2 * pad, w + 2 * pad
    # Normalised centres of the first h (w) padded pixels (align_corners=False).
    ys = torch.linspace(-1.0 + 1.0 / hp, 1.0 - 1.0 / hp, hp, device=x.device, dtype=images.dtype)
    xs = torch.linspace(-1.0 + 1.0 / wp, 1.0 - 1.0 / wp, wp, device=x.device, dtype=images.dtype)
    grid_y, grid_x = torch.meshgrid(ys[:h], xs[:w], indexing="ij")
    base_grid = torch.stack([grid_x, grid_y], dim=-1)  # [H, W, 2], (x, y) order
    offset = (shifts.flip(-1) + pad).to(images.dtype)  # crop offset in {0..2 pad}, (x, y)
    offset = offset * torch.tensor([2.0 / wp, 2.0 / hp], device=x.device, dtype=images.dtype)
    grid = base_grid.unsqueeze(0) + offset[:, None, None, :]
    out = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(*batch, c, h, w)


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _all_corner_shifts(n: int, pad: int, seed: int = 0) -> torch.Tensor:
    """The extreme shifts first, then random ones."""
    corners = torch.tensor([[-pad, -pad], [-pad, pad], [pad, -pad], [pad, pad], [0, 0], [0, pad]])
    rest = sample_shifts(n - len(corners), pad, torch.Generator().manual_seed(seed))
    return torch.cat([corners, rest])


def test_integer_shift_equals_grid_sample_reference_float32() -> None:
    x = _images(16, 9, 84, 84)
    shifts = _all_corner_shifts(16, PAD)
    fast = random_shift(x, PAD, shifts=shifts)
    ref = random_shift_grid_sample(x, PAD, shifts=shifts)
    assert ref.dtype == torch.float32
    # Bilinear weights at pixel centres are 1/0 up to float32 rounding (~4e-3 on 0..255).
    torch.testing.assert_close(fast.float(), ref, atol=2e-2, rtol=0)


def test_integer_shift_equals_grid_sample_reference_float64_non_square() -> None:
    x = torch.rand(7, 2, 10, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shifts = _all_corner_shifts(7, 3)
    torch.testing.assert_close(
        random_shift(x, 3, shifts=shifts),
        random_shift_grid_sample(x, 3, shifts=shifts),
        atol=1e-10,
        rtol=0,
    )


def test_replicate_padding_on_hand_built_image() -> None:
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    shifts = torch.tensor([[2, -1]])  # read row i + 2, column j - 1, clamped to the image
    expected = torch.tensor(
        [[8, 8, 9, 10], [12, 12, 13, 14], [12, 12, 13, 14], [12, 12, 13, 14]], dtype=torch.uint8
    ).view(1, 1, 4, 4)
    assert torch.equal(random_shift(x, 2, shifts=shifts), expected)
    assert torch.equal(random_shift_grid_sample(x, 2, shifts=shifts).round().byte(), expected)


def test_zero_shift_is_identity() -> None:
    x = _images(4, 9, 84, 84)
    out = random_shift(x, PAD, shifts=torch.zeros(4, 2, dtype=torch.long))
    assert torch.equal(out, x)
    assert torch.equal(random_shift(x, 0), x)  # pad 0 can only draw zero shifts


def test_uint8_in_uint8_out_and_float_keeps_dtype() -> None:
    x = _images(3, 9, 84, 84)
    out = RandomShift(PAD)(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    xf = x.double()
    assert random_shift(xf, PAD).dtype == torch.float64


def test_shifts_within_pad_and_module_uses_them() -> None:
    for pad in (2, PAD):
        shifts = sample_shifts(5000, pad, torch.Generator().manual_seed(0))
        assert shifts.dtype == torch.long and shifts.shape == (5000, 2)
        for axis in range(2):  # every value in [-pad, pad] on both axes, nothing else
            assert shifts[:, axis].unique().tolist() == list(range(-pad, pad + 1))
    # The module draws its shifts the same way from the generator it is given.
    x = _images(64, 3, 20, 20)
    out = RandomShift(PAD)(x, generator=torch.Generator().manual_seed(5))
    drawn = sample_shifts(64, PAD, torch.Generator().manual_seed(5))
    assert torch.equal(out, random_shift(x, PAD, shifts=drawn))


def test_different_seeds_give_different_shifts() -> None:
    x = _images(32, 9, 84, 84)

    def shift(seed: int) -> torch.Tensor:
        return random_shift(x, PAD, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(shift(0), shift(0))
    assert not torch.equal(shift(0), shift(1))
    a = sample_shifts(32, PAD, torch.Generator().manual_seed(0))
    b = sample_shifts(32, PAD, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_each_image_gets_its_own_shift() -> None:
    x = _images(5, 3, 12, 12)
    shifts = torch.tensor([[0, 0], [1, 0], [0, -2], [-3, 3], [4, 4]])
    out = random_shift(x, PAD, shifts=shifts)
    for i in range(5):
        assert torch.equal(out[i], random_shift(x[i], PAD, shifts=shifts[i]))


def test_channels_last_input_and_leading_batch_dims() -> None:
    x = _images(2, 3, 9, 84, 84)
    shifts = sample_shifts(6, PAD, torch.Generator().manual_seed(0)).view(2, 3, 2)
    out = random_shift(x, PAD, shifts=shifts)
    assert out.shape == x.shape
    flat = random_shift(x.view(6, 9, 84, 84), PAD, shifts=shifts.view(6, 2))
    assert torch.equal(out, flat.view_as(x))
    x_cl = x.view(6, 9, 84, 84).contiguous(memory_format=torch.channels_last)
    out_cl = random_shift(x_cl, PAD, shifts=shifts.view(6, 2))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_cl, flat)


def test_wrong_number_of_shifts_is_an_error() -> None:
    with pytest.raises(ValueError, match="one"):
        random_shift(_images(4, 3, 8, 8), PAD, shifts=torch.zeros(3, 2, dtype=torch.long))
