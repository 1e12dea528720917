"""Tests for the DrQ-v2 pixel encoder and the state encoder (agents/encoder.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agents.encoder import PixelEncoder, StateEncoder, weight_init

OBS_SHAPE = (9, 84, 84)


def _pixels(*batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*batch, *OBS_SHAPE), generator=g, dtype=torch.uint8)


def _convs(encoder: nn.Module) -> list[nn.Conv2d]:
    return [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]


def _drqv2_forward(encoder: PixelEncoder, obs: torch.Tensor) -> torch.Tensor:
    """DrQ-v2's Encoder.forward written out by hand with the encoder's weights."""
    h = obs.float() / 255.0 - 0.5
    for conv, stride in zip(_convs(encoder), (2, 1, 1, 1), strict=True):
        h = F.relu(F.conv2d(h, conv.weight, conv.bias, stride=stride))
    return h.view(h.shape[0], -1)


def test_output_shape_is_39200_from_uint8_frame_stack() -> None:
    enc = PixelEncoder(OBS_SHAPE)
    out = enc(_pixels(3))
    assert enc.repr_dim == 39_200 == 32 * 35 * 35
    assert enc.out_shape == (32, 35, 35)
    assert out.shape == (3, 39_200)
    assert out.dtype == torch.float32


def test_matches_hand_written_drqv2_forward() -> None:
    """Same layers, normalisation and (C, H, W) flatten order as DrQ-v2, nothing extra."""
    torch.manual_seed(0)
    enc = PixelEncoder(OBS_SHAPE)
    convs = _convs(enc)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(9, 32)] + [(32, 32)] * 3
    assert [c.stride for c in convs] == [(2, 2)] + [(1, 1)] * 3
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)
    obs = _pixels(2)
    torch.testing.assert_close(enc(obs), _drqv2_forward(enc, obs))


def test_leading_batch_dims_and_unbatched_input() -> None:
    enc = PixelEncoder(OBS_SHAPE)
    obs = _pixels(2, 3)
    out = enc(obs)
    assert out.shape == (2, 3, 39_200)
    torch.testing.assert_close(out, enc(obs.reshape(6, *OBS_SHAPE)).reshape(2, 3, -1))
    torch.testing.assert_close(enc(obs[1, 2]), out[1, 2])


def test_float_pixels_on_0_255_scale_match_uint8() -> None:
    enc = PixelEncoder(OBS_SHAPE)
    obs = _pixels(2)
    torch.testing.assert_close(enc(obs.float()), enc(obs))


def test_parameter_count_matches_hand_computation() -> None:
    enc = PixelEncoder(OBS_SHAPE)
    first = 9 * 32 * 3 * 3 + 32  # 2,624
    others = 3 * (32 * 32 * 3 * 3 + 32)  # 3 x 9,248
    assert sum(p.numel() for p in enc.parameters()) == first + others == 30_368


def test_drqv2_orthogonal_init() -> None:
    enc = PixelEncoder(OBS_SHAPE)
    gain = nn.init.calculate_gain("relu")
    for conv in _convs(enc):
        w = conv.weight.detach().flatten(1)  # [32, fan_in], fan_in >= 32: orthogonal rows
        torch.testing.assert_close(w @ w.T, gain**2 * torch.eye(32), atol=1e-5, rtol=0)
        assert torch.count_nonzero(conv.bias) == 0
    lin = nn.Linear(20, 8)
    weight_init(lin)
    torch.testing.assert_close(lin.weight @ lin.weight.T, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.count_nonzero(lin.bias) == 0


def test_same_seed_same_init_different_seed_different_init() -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return PixelEncoder(OBS_SHAPE).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_channels_last_gives_same_features() -> None:
    torch.manual_seed(0)
    ref = PixelEncoder(OBS_SHAPE)
    torch.manual_seed(0)
    fast = PixelEncoder(OBS_SHAPE, channels_last=True)
    assert fast.convnet[0].weight.is_contiguous(memory_format=torch.channels_last)
    obs = _pixels(2)
    # An HWC frame permuted to CHW is a channels-last tensor: feed it as such too.
    obs_cl = obs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    expected = ref(obs)
    for encoder, x in ((fast, obs), (fast, obs_cl), (ref, obs_cl)):
        out = encoder(x)
        assert out.shape == (2, 39_200)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_every_conv() -> None:
    enc = PixelEncoder(OBS_SHAPE)
    enc(_pixels(2)).square().mean().backward()
    for conv in _convs(enc):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_state_encoder_identity_by_default() -> None:
    enc = StateEncoder(24)
    obs = torch.randn(5, 24, dtype=torch.float64)
    assert enc.repr_dim == 24
    assert sum(p.numel() for p in enc.parameters()) == 0
    assert torch.equal(enc(obs), obs)
    assert enc(torch.ones(2, 3, 24, dtype=torch.int64)).dtype == torch.float32


def test_state_encoder_mlp() -> None:
    enc = StateEncoder(24, hidden_dims=(64, 32))
    assert enc.repr_dim == 32
    assert sum(p.numel() for p in enc.parameters()) == (24 * 64 + 64) + (64 * 32 + 32)
    out = enc(torch.randn(2, 3, 24))
    assert out.shape == (2, 3, 32)
    assert (out >= 0).all()  # ends with the activation (ReLU)
    assert torch.count_nonzero(enc.net[0].bias) == 0  # DrQ-v2 init
