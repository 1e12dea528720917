"""Collapse metrics (agents.policy_stats) on action sets whose answer is known."""

import math

import pytest
import torch

from agents.consistency_policy import make_consistency_actor
from agents.policy_stats import action_spread, bound_fraction


def test_bound_fraction_counts_entries_within_tolerance_of_either_bound() -> None:
    actions = torch.tensor([[1.0, -1.0, 0.5], [0.9995, -0.2, -0.9985]])
    assert bound_fraction(actions).item() == pytest.approx(3 / 6)  # 1, -1, 0.9995
    assert bound_fraction(actions, tol=2e-3).item() == pytest.approx(4 / 6)
    assert bound_fraction(torch.zeros(5, 2)).item() == 0.0
    assert bound_fraction(torch.tensor([[2.0, -3.0]]), low=-3.0, high=2.0).item() == 1.0


def test_action_spread_of_known_sample_sets() -> None:
    # two draws 0 and 1 at one state: unbiased variance 0.5
    assert action_spread(torch.tensor([[[0.0]], [[1.0]]])).item() == pytest.approx(
        math.sqrt(0.5))
    # a deterministic policy has no spread, whatever its actions
    same = torch.randn(1, 7, 3).expand(4, 7, 3)
    assert action_spread(same).item() == 0.0
    # mu(s) + sigma z: the spread estimates sigma, not the spread of mu over states
    generator = torch.Generator().manual_seed(0)
    mu = 5 * torch.randn(16, 2, generator=generator)
    draws = mu + 0.3 * torch.randn(20_000, 16, 2, generator=generator)
    assert action_spread(draws).item() == pytest.approx(0.3, rel=0.01)
    # per-dimension variances are averaged before the root: sigmas 0.1 and 0.7
    scales = torch.tensor([0.1, 0.7])
    draws = scales * torch.randn(20_000, 8, 2, generator=generator)
    assert action_spread(draws).item() == pytest.approx(math.sqrt((0.01 + 0.49) / 2), rel=0.01)
    with pytest.raises(ValueError, match="K >= 2"):
        action_spread(torch.zeros(1, 4, 2))


def test_consistency_policy_samples_at_fixed_states() -> None:
    torch.manual_seed(0)
    actor = make_consistency_actor(5, 2, hidden_dim=32)
    policy = actor.module
    features = torch.randn(10, 5)
    torch.manual_seed(1)
    from_raw = policy.samples_at(features, 4, 6)
    torch.manual_seed(1)
    from_projection = policy.samples_at(policy.condition(features), 4, 6)
    assert from_raw.shape == (6, 4, 2)
    torch.testing.assert_close(from_raw, from_projection)
    # the draws at one state are those of the policy at that state: same noise, same actions
    torch.manual_seed(1)
    direct = policy(features[:4].expand(6, 4, 5))
    torch.testing.assert_close(from_raw, direct)
    assert action_spread(from_raw) > 0
