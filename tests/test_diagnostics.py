"""The diagnostic scripts behind docs/results' pixel diagnosis reproduce what they are cited
for: benchmarks/diagnostics/actor_balance.py (the entropy term against a fixed critic that
prefers the bounds) and benchmarks/diagnostics/critic_scale.py (how fast each critic's output
reaches the returns' scale)."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import benchmark_module

actor_balance = benchmark_module("actor_balance")
critic_scale = benchmark_module("critic_scale")


@pytest.mark.parametrize("kind", ["linear", "interior"])
def test_fixed_critic_is_best_at_its_best_action(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    critic = actor_balance.FixedCritic(kind, 0.15, 1, generator)
    features = torch.randn(16, actor_balance.REPR_DIM, generator=generator)
    grid = torch.linspace(-1, 1, 201)
    q = torch.stack([critic.mean(features, a.expand(16, 1)) for a in grid], dim=1)
    best_on_grid = grid[q.argmax(dim=1)]
    torch.testing.assert_close(best_on_grid, critic.best_action(features)[:, 0],
                               atol=0.01, rtol=0)
    if kind == "linear":  # Q varies by at most 2 * slope over the action range
        assert float((q.max(1).values - q.min(1).values).max()) <= 0.3 + 1e-6


def test_paper_lambda_loses_to_a_bound_preferring_critic_and_a_large_one_holds() -> None:
    """Documented (docs/results, diagnosis item 8): at lambda 0.05 a critic whose Q varies by
    0.3 over the actions has driven 28-38% of the samples onto the bounds after 250 updates
    (65-70% after 500); with no critic (Q = 0) or with lambda 2 none are there."""
    stats = {name: actor_balance.run(*actor_balance.VARIANTS[name], updates=250,
                                     action_dim=1, seed=1)[250]
             for name in ("linear0.15_b32", "none_b32", "linear0.15_b32_lambda2")}
    assert stats["linear0.15_b32"]["bound_frac"] > 0.15
    assert stats["none_b32"]["bound_frac"] < 0.05 and stats["none_b32"]["spread"] > 0.1
    assert stats["linear0.15_b32_lambda2"]["bound_frac"] < 0.05


def test_mixture_critic_reaches_the_return_scale_slower_than_drqv2s() -> None:
    """Documented (diagnosis item 5): after 1,000 updates towards a target of scale 100,
    DrQ-v2's critic is within ~6 of it, CP3ER's mixture critic still ~90 away."""
    drqv2 = critic_scale.run(*critic_scale.VARIANTS["drqv2_h256"], steps=1000, scale=100.0)
    cp3er = critic_scale.run(*critic_scale.VARIANTS["cp3er_h256"], steps=1000, scale=100.0)
    assert drqv2[1000] < drqv2[500] and cp3er[1000] < cp3er[500]  # both learn
    assert drqv2[1000] < 10 and cp3er[1000] > 50


def test_first_difference_finds_the_first_changed_row_and_ignores_timing(tmp_path) -> None:
    """Rows matched by (phase, frame): a changed wall-clock column is not a difference, a
    changed loss is; a row with no partner (off the other run's frame grid) is counted apart."""
    first_difference = benchmark_module("first_difference")
    header = "frame,step,phase,seconds,loss_actor,episode_return\n"
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "metrics.csv").write_text(
        header + "1000,500,train,1.0,,10\n2000,1000,train,2.0,0.5,11\n"
        "3000,1500,train,3.0,0.4,12\n4000,2000,eval,4.0,,30\n")
    variant = tmp_path / "variant"
    variant.mkdir()
    rows = ("1000,500,train,9.0,,10\n2500,1250,train,9.5,0.3,11\n2000,1000,train,9.9,0.5,11\n"
            "3000,1500,train,10.0,0.41,12\n")
    (variant / "metrics.csv").write_text(header + rows)
    result = first_difference.first_difference(first_difference.read_rows(variant),
                                               first_difference.read_rows(reference))
    assert result["compared"] == 2 and result["unmatched"] == 1
    assert result["first_difference"] == {"phase": "train", "frame": 3000,
                                          "columns": {"loss_actor": ["0.41", "0.4"]}}
    same = first_difference.first_difference(first_difference.read_rows(reference),
                                             first_difference.read_rows(reference))
    assert same["first_difference"] is None and same["last_frame"] == 4000
