"""DrQ-v2 baseline: losses, gradient isolation, the exploration schedule, learning."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import SoftUpdate

from agents.agent import Agent
from agents.consistency_policy import make_policy
from agents.drqv2 import (
    DoubleQCritic,
    DrQV2Loss,
    ScheduledGaussianNoise,
    make_drqv2_actor,
    smoothed_action,
)
from agents.encoder import StateEncoder

OBS_DIM, ACTION_DIM, BATCH = 6, 2, 16


def _spec(dim: int = ACTION_DIM) -> Bounded:
    return Bounded(-1.0, 1.0, shape=(dim,))


def _loss(seed: int = 0, obs_dim: int = OBS_DIM, action_dim: int = ACTION_DIM,
          hidden: int = 32, steps: int = 100) -> DrQV2Loss:
    torch.manual_seed(seed)
    encoder = TensorDictModule(StateEncoder(obs_dim, hidden_dims=(16,)), ["observation"],
                               ["features"])
    actor = make_drqv2_actor(16, action_dim, feature_dim=8, hidden_dim=hidden)
    critic = DoubleQCritic(16, action_dim, feature_dim=8, hidden_dim=hidden)
    noise = ScheduledGaussianNoise(_spec(action_dim), 1.0, 0.1, steps)
    return DrQV2Loss(encoder, actor, critic, noise)


def _batch(seed: int = 1, discount: float = 0.97) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": torch.randn(BATCH, OBS_DIM, generator=gen),
        "action": torch.rand(BATCH, ACTION_DIM, generator=gen) * 2 - 1,
        "next": {"observation": torch.randn(BATCH, OBS_DIM, generator=gen),
                 "reward": torch.randn(BATCH, 1, generator=gen),
                 "discount": torch.full((BATCH, 1), discount)},
    }, [BATCH])


def _touched(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_forward_keys_and_finite_scalars() -> None:
    out = _loss()(_batch())
    for key in ("loss_critic", "loss_actor", "q_mean", "target_mean", "stddev", "actor_q"):
        assert out[key].shape == () and torch.isfinite(out[key]), key


def test_critic_loss_reaches_critic_and_encoder_not_actor() -> None:
    loss = _loss()
    batch = _batch()
    value, _ = loss.critic_loss(batch, *loss.encode_transition(batch))
    value.backward()
    assert _touched(loss.encoder) and _touched(loss.critic_params)
    assert not _touched(loss.actor)
    assert all(p.grad is None for p in loss.target_critic_params.values(True, True))


def test_actor_loss_reaches_the_actor_only() -> None:
    loss = _loss()
    batch = _batch()
    value, _ = loss.actor_loss(batch, loss.encode_transition(batch)[0])
    value.backward()
    assert _touched(loss.actor)
    assert not _touched(loss.encoder) and not _touched(loss.critic_params)


def test_target_is_clipped_double_q_and_termination_cuts_it() -> None:
    loss = _loss()
    batch = _batch(discount=0.0)
    _, meta = loss.critic_loss(batch, *loss.encode_transition(batch))
    torch.testing.assert_close(meta["target_mean"], batch["next", "reward"].mean())
    # with the noise switched off the target is exactly r + d * min(Q1', Q2')(s', mu(s'))
    loss.stddev_clip = 0.0
    batch = _batch(discount=0.9)
    _, meta = loss.critic_loss(batch, *loss.encode_transition(batch))
    with torch.no_grad(), loss.target_critic_params.to_module(loss.critic):
        feats = loss.encoder.module(batch["next", "observation"])
        q1, q2 = loss.critic(feats, loss.actor.module(feats).clamp(-1 + 1e-6, 1 - 1e-6))
    expected = (batch["next", "reward"] + 0.9 * torch.minimum(q1, q2)).mean()
    torch.testing.assert_close(meta["target_mean"], expected)


def test_soft_update_moves_the_target_by_tau() -> None:
    loss = _loss()
    updater = SoftUpdate(loss, tau=0.25)
    before = loss.target_critic_params.clone()
    loss.critic_params.apply_(lambda p: p.data.add_(1.0))
    updater.step()
    expected = before.apply(lambda t, o: 0.75 * t + 0.25 * o, loss.critic_params)
    torch.testing.assert_close(loss.target_critic_params.to_dict(), expected.to_dict())


def test_smoothed_action_clips_noise_and_bounds_and_passes_gradient() -> None:
    mean = torch.full((10_000, 1), 0.95, requires_grad=True)
    action = smoothed_action(mean, 5.0, clip=0.3, generator=torch.Generator().manual_seed(0))
    assert action.max() <= 1 - 1e-6 and action.min() >= 0.95 - 0.3 - 1e-6
    assert (action < 0.95 - 0.29).float().mean() > 0.3  # std 5: most noise is clipped
    action.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))  # straight through


def test_exploration_schedule_is_drqv2_linear_and_saved() -> None:
    noise = ScheduledGaussianNoise(_spec(), 1.0, 0.1, annealing_num_steps=500_000)
    noise.step(125_000)
    assert float(noise.sigma) == pytest.approx(1.0 - 0.9 * 0.25, abs=1e-6)
    noise.step(10**6)
    assert float(noise.sigma) == pytest.approx(0.1, abs=1e-7)
    fresh = ScheduledGaussianNoise(_spec(), 1.0, 0.1, annealing_num_steps=500_000)
    fresh.load_state_dict(noise.state_dict())
    assert int(fresh.steps) == 1_125_000 and float(fresh.sigma) == pytest.approx(0.1)


def test_noise_only_when_exploring() -> None:
    loss = _loss(steps=10)
    agent_policy = make_policy(loss.encoder, loss.actor)
    td = TensorDict({"observation": torch.randn(64, OBS_DIM)}, [64])
    with torch.no_grad():
        mean = agent_policy(td.clone())["action"]
        explore = TensorDictSequential(agent_policy, loss.exploration)
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            torch.testing.assert_close(explore(td.clone())["action"], mean)
        with set_exploration_type(ExplorationType.RANDOM):
            noisy = explore(td.clone())["action"]
    assert (noisy - mean).abs().mean() > 0.3 and noisy.abs().max() <= 1


def _bandit_batch(gen: torch.Generator, size: int = 256) -> TensorDict:
    state = torch.rand(size, 1, generator=gen) * 1.6 - 0.8
    action = torch.rand(size, 1, generator=gen) * 2 - 1
    return TensorDict({"observation": state, "action": action,
                       "next": {"observation": state, "reward": -((action - state) ** 2),
                                "discount": torch.zeros(size, 1)}}, [size])


def test_drqv2_learns_a_contextual_bandit() -> None:
    """Reward -(a - s)^2, one step: the best action is a = s. Measured mean |mu(s) - s|:
    0.34-0.55 untrained, 0.015-0.018 after 400 updates (seeds 0-3)."""
    torch.manual_seed(0)
    encoder = TensorDictModule(StateEncoder(1), ["observation"], ["features"])
    actor = make_drqv2_actor(1, 1, feature_dim=16, hidden_dim=64)
    critic = DoubleQCritic(1, 1, feature_dim=16, hidden_dim=64)
    noise = ScheduledGaussianNoise(_spec(1), 0.2, 0.2, 1)
    loss = DrQV2Loss(encoder, actor, critic, noise)
    optimizers = {"critic": torch.optim.Adam(list(loss.critic_params.values(True, True)), 3e-3),
                  "actor": torch.optim.Adam(actor.parameters(), 3e-3)}
    agent = Agent(make_policy(encoder, actor), loss, optimizers, SoftUpdate(loss, tau=0.05),
                  "observation", exploration=noise)
    state = torch.linspace(-0.8, 0.8, 101).unsqueeze(-1)

    def error() -> float:
        with torch.no_grad():
            action = agent.policy(TensorDict({"observation": state}, [101]))["action"]
        return float((action - state).abs().mean())

    before = error()
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        agent.update(_bandit_batch(gen))
    assert before > 0.2 and error() < 0.08, (before, error())
