"""Tests for the mixture-of-Gaussians critic (agents/critic.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D
from torch import nn

from agents.critic import (
    MIN_SCALE,
    MoGCritic,
    mog_distribution,
    mog_log_prob,
    mog_mean,
    mog_sample,
)

REPR, ACT, K = 12, 3, 3


def _critic(seed: int = 0, **kwargs: object) -> MoGCritic:
    torch.manual_seed(seed)
    kwargs = {"feature_dim": 8, "hidden_dim": 32, **kwargs}
    return MoGCritic(REPR, ACT, **kwargs)


def _inputs(*batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, REPR, generator=g), torch.rand(*batch, ACT, generator=g) * 2 - 1


@pytest.mark.parametrize("batch", [(5,), (2, 4)])
@pytest.mark.parametrize("num_components", [1, 3])
def test_shapes(batch: tuple[int, ...], num_components: int) -> None:
    critic = _critic(num_components=num_components)
    feats, act = _inputs(*batch)
    loc, scale, logits = critic(feats, act)
    for t in (loc, scale, logits):
        assert t.shape == (*batch, num_components)
    assert critic.mean(feats, act).shape == (*batch, 1)
    values = critic.sample_values(feats, act, num_samples=7)
    assert values.shape == (*batch, 7)
    assert critic.log_prob(feats, act, values).shape == (*batch, 7)
    mix = critic.mixture(feats, act)
    assert isinstance(mix, D.MixtureSameFamily)
    assert isinstance(mix.component_distribution, D.Normal)
    assert mix.batch_shape == batch


def test_parameter_count_at_paper_sizes() -> None:
    repr_dim, action_dim, feature, hidden = 39_200, 6, 50, 1024
    critic = MoGCritic(repr_dim, action_dim, feature_dim=feature, hidden_dim=hidden)
    trunk = (repr_dim * feature + feature) + 2 * feature  # Linear + LayerNorm
    layer1 = ((feature + action_dim) * hidden + hidden) + 2 * hidden  # Linear + LayerNorm
    layer2 = (hidden * hidden + hidden) + 2 * hidden  # Linear + LayerNorm
    heads = 3 * (hidden * 3 + 3)  # loc, scale and logits
    expected = trunk + layer1 + layer2 + heads
    assert sum(p.numel() for p in critic.parameters()) == expected == 3_081_439


def test_trunk_is_linear_layernorm_with_default_init() -> None:
    assert [type(m) for m in _critic().trunk] == [nn.Linear, nn.LayerNorm]
    assert torch.count_nonzero(_critic().loc_head.bias) > 0  # PyTorch default, as the reference


def test_scale_parameterisation_and_floor() -> None:
    critic = _critic(init_scale=1e-3)
    feats, act = _inputs(64)
    _, scale, _ = critic(feats, act)
    # By hand: init_scale * softplus(x) / softplus(0) + 1e-4 on the raw head output.
    raw = critic.scale_head(critic.torso(torch.cat([critic.trunk(feats), act], -1)))
    expected = 1e-3 * torch.nn.functional.softplus(raw) / math.log(2.0) + 1e-4
    torch.testing.assert_close(scale, expected)
    assert (scale >= MIN_SCALE).all()
    assert (scale > 1e-4).all() and (scale < 1e-2).all()  # of order init_scale at init
    with torch.no_grad():
        critic.scale_head.weight.zero_()
        critic.scale_head.bias.zero_()
    _, scale, _ = critic(feats, act)  # a zero head output gives exactly init_scale + floor
    torch.testing.assert_close(scale, torch.full_like(scale, 1e-3 + 1e-4))
    with torch.no_grad():
        critic.scale_head.bias.fill_(-1e4)
    _, scale, _ = critic(feats, act)
    assert torch.equal(scale, torch.full_like(scale, MIN_SCALE))


def test_mean_is_softmax_weighted_locs() -> None:
    critic = _critic()
    feats, act = _inputs(6)
    loc, _, logits = critic(feats, act)
    by_hand = (torch.softmax(logits, -1) * loc).sum(-1, keepdim=True)
    torch.testing.assert_close(critic.mean(feats, act), by_hand)
    torch.testing.assert_close(critic.mean(feats, act), critic.mixture(feats, act).mean[..., None])
    loc = torch.tensor([[1.0, -2.0, 4.0]])
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    torch.testing.assert_close(mog_mean(loc, logits), torch.tensor([[0.5 - 0.5 + 1.0]]))


def test_log_prob_on_hand_values() -> None:
    mu, sigma, weights = [0.0, 2.0, -1.0], [1.0, 0.5, 2.0], [0.2, 0.5, 0.3]
    values = [0.5, -3.0, 2.0, 30.0]
    loc, scale = torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
    logits = torch.log(torch.tensor([weights], dtype=torch.float64)) + 7.0  # shift-invariant
    got = mog_log_prob(loc, scale, logits, torch.tensor([values], dtype=torch.float64))

    def by_hand(v: float) -> float:
        return math.log(
            sum(
                w * math.exp(-((v - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi))
                for m, s, w in zip(mu, sigma, weights, strict=True)
            )
        )

    expected = torch.tensor([[by_hand(v) for v in values]], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    reference = mog_distribution(loc, scale, logits).log_prob(torch.tensor(values)[:, None])
    torch.testing.assert_close(got, reference.T.to(got.dtype))


def test_critic_log_prob_matches_torch_distributions() -> None:
    critic = _critic()
    feats, act = _inputs(2, 5)
    values = torch.randn(2, 5, 11) * 1e-2
    got = critic.log_prob(feats, act, values)
    reference = critic.mixture(feats, act).log_prob(values.movedim(-1, 0)).movedim(0, -1)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-3)


def test_sample_values_match_the_mixture_and_carry_no_grad() -> None:
    loc = torch.tensor([[-5.0, 0.0, 5.0]])
    scale = torch.tensor([[0.1, 1.0, 0.5]])
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    values = mog_sample(loc, scale, logits, 200_000, generator=torch.Generator().manual_seed(0))
    assert values.shape == (1, 200_000)
    mean = 0.2 * -5 + 0.3 * 5
    var = 0.2 * (0.01 + 25) + 0.5 * 1 + 0.3 * (0.25 + 25) - mean**2
    assert values.mean().item() == pytest.approx(mean, abs=0.03)
    assert values.var().item() == pytest.approx(var, rel=0.02)
    assert (values < -2.5).float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert (values > 2.5).float().mean().item() == pytest.approx(0.3, abs=0.005)

    critic = _critic()
    feats, act = _inputs(4)
    drawn = critic.sample_values(feats, act, 20, generator=torch.Generator().manual_seed(3))
    again = critic.sample_values(feats, act, 20, generator=torch.Generator().manual_seed(3))
    assert drawn.shape == (4, 20) and torch.equal(drawn, again)
    assert not drawn.requires_grad


def test_gradients_reach_every_parameter_and_the_action() -> None:
    critic = _critic()
    feats, act = _inputs(8)
    critic.log_prob(feats, act, torch.randn(8, 4) * 1e-3).mean().neg().backward()
    for name, p in critic.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    act = act.clone().requires_grad_(True)
    critic.mean(feats, act).sum().backward()  # the actor's path
    assert act.grad is not None and act.grad.abs().sum() > 0


# --- a tiny distributional regression --------------------------------------------------


def _fit_bimodal(critic: MoGCritic, steps: int = 200, seed: int = 0) -> dict[str, float]:
    """Fit Z(s, a) to 0.5 N(-1, 0.1^2) + 0.5 N(1, 0.1^2) for every (s, a) by the CP3ER
    critic loss (-log p of 32 target samples), and report what the mixture learnt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is faster on a loaded machine
    try:
        g = torch.Generator().manual_seed(seed)
        feats, act = torch.randn(64, REPR, generator=g), torch.rand(64, ACT, generator=g) * 2 - 1

        def targets() -> torch.Tensor:
            mode = torch.randint(0, 2, (64, 32), generator=g) * 2.0 - 1.0
            return mode + 0.1 * torch.randn(64, 32, generator=g)

        held_out = targets()
        with torch.no_grad():
            nll_start = -critic.log_prob(feats, act, held_out).mean().item()
        opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = -critic.log_prob(feats, act, targets()).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            nll_end = -critic.log_prob(feats, act, held_out).mean().item()
            loc, _, logits = critic(feats, act)
            weights, top2 = torch.softmax(logits, -1).topk(2, dim=-1)
            modes = loc.gather(-1, top2).sort(dim=-1).values
            mode_error = (modes - torch.tensor([-1.0, 1.0])).abs().max().item()
    finally:
        torch.set_num_threads(threads)
    return {
        "nll_start": nll_start,
        "nll_end": nll_end,
        "mode_error": mode_error,
        "min_top2_weight": weights.min().item(),
    }


def _fits(result: dict[str, float]) -> bool:
    # Measured over seeds 0-3 (200 steps): nll_end -0.18..-0.21 (the target's entropy is
    # -0.19), mode_error <= 0.025, min_top2_weight >= 0.45; with the loc head detached:
    # nll_end >= 1.0, mode_error >= 0.85.
    return (
        result["nll_end"] < 0.2
        and result["nll_end"] < result["nll_start"] - 5.0
        and result["mode_error"] < 0.15
        and result["min_top2_weight"] > 0.35
    )


class _DetachedLocCritic(MoGCritic):
    """A broken critic (loc head cut from the graph): the regression must catch it."""

    def forward(self, features, action):  # type: ignore[no-untyped-def]
        loc, scale, logits = super().forward(features, action)
        return loc.detach(), scale, logits


def test_fits_a_bimodal_target() -> None:
    # init_scale 0.1 (not 1e-3) so that 200 Adam steps suffice to grow the scales to 0.1.
    torch.manual_seed(0)
    critic = MoGCritic(REPR, ACT, feature_dim=16, hidden_dim=64, init_scale=0.1)
    result = _fit_bimodal(critic)
    assert _fits(result), result


def test_bimodal_regression_catches_a_detached_loc_head() -> None:
    torch.manual_seed(0)
    critic = _DetachedLocCritic(REPR, ACT, feature_dim=16, hidden_dim=64, init_scale=0.1)
    result = _fit_bimodal(critic)
    assert not _fits(result), result
