"""The agent learns: a one-step contextual bandit (fast) and pixel-free DMC (slow);
identical seeds give identical runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.objectives import SoftUpdate

from agents.agent import Agent
from agents.consistency_policy import CP3ERLoss, make_consistency_actor, make_policy
from agents.critic import MoGCritic
from agents.encoder import StateEncoder
from cp3er.config_schema import CONFIG_DIR
from cp3er.train import Trainer


def _bandit_agent(seed: int) -> Agent:
    torch.manual_seed(seed)
    encoder = TensorDictModule(StateEncoder(1), ["observation"], ["features"])
    actor = make_consistency_actor(1, 1, hidden_dim=64)
    critic = MoGCritic(1, 1, feature_dim=16, hidden_dim=64, init_scale=0.1)
    loss = CP3ERLoss(encoder, actor, critic)
    updater = SoftUpdate(loss, tau=0.05)
    optimizers = {
        "critic": torch.optim.Adam(list(loss.critic_params.values(True, True)), lr=3e-3),
        "actor": torch.optim.Adam(actor.parameters(), lr=3e-3),
    }
    return Agent(make_policy(encoder, actor), loss, optimizers, updater, "observation")


def _bandit_batch(gen: torch.Generator, size: int = 256) -> TensorDict:
    """Reward -(a - s)^2 / (terminal, one step): the best action is a = s."""
    state = torch.rand(size, 1, generator=gen) * 1.6 - 0.8
    action = torch.rand(size, 1, generator=gen) * 2 - 1
    reward = -((action - state) ** 2)
    return TensorDict({"observation": state, "action": action,
                       "next": {"observation": state, "reward": reward,
                                "discount": torch.zeros(size, 1)}}, [size])


def _policy_error(agent: Agent) -> float:
    state = torch.linspace(-0.8, 0.8, 101).unsqueeze(-1)
    with torch.no_grad():
        action = agent.policy(TensorDict({"observation": state}, [101]))["action"]
    return float((action - state).abs().mean())


def test_cp3er_learns_a_contextual_bandit() -> None:
    agent = _bandit_agent(seed=0)
    gen = torch.Generator().manual_seed(0)
    before = _policy_error(agent)
    for _ in range(600):
        metrics = agent.update(_bandit_batch(gen))
    after = _policy_error(agent)
    # measured mean |pi(s) - s|: 0.41 untrained; after 600 updates 0.026 / 0.027 / 0.20 /
    # 0.092 for seeds 0-3 on one host, seed 0: 0.162 (pytest) and 0.077 (1 thread) on
    # another (the floating-point path differs between CPUs and thread counts, and the
    # error oscillates between updates: 0.03 / 0.077 / 0.034 / 0.091 at 300 / 600 / 900 /
    # 1200); with the Q-gradient into the actor cut, 0.59-0.69.
    assert before > 0.3
    assert after < 0.25, (before, after)
    assert metrics["q_mean"] == pytest.approx(-0.7, abs=0.4)  # E[-(a-s)^2], a ~ U(-1, 1)


def _cfg(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=[f"run_dir={run_dir}", *overrides])


def _losses(run_dir: Path) -> list[tuple[str, str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [(r["frame"], r["episode_return"], r["loss_critic"])
                for r in csv.DictReader(handle) if r["phase"] == "train"]


def test_same_seed_same_run(tmp_path: Path) -> None:
    small = ["task=cartpole_balance", "obs=state", "frames=2000", "hidden_dim=32",
             "batch_size=32", "schedule.seed_frames=600", "schedule.explore_frames=1000",
             "schedule.eval_every_frames=0", "schedule.eval_episodes=1", "log.progress=false"]
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        Trainer(_cfg(tmp_path / name, *small, f"seed={seed}")).train()
        runs[name] = _losses(tmp_path / name)
    assert len(runs["a"]) == 2 and runs["a"][1][2] != ""
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


_CARTPOLE_STATE = ("task=cartpole_balance", "obs=state", "seed=1", "frames=12000",
                   "hidden_dim=256", "lr=1e-3", "schedule.explore_frames=2000",
                   "schedule.seed_frames=2000", "schedule.eval_every_frames=4000",
                   "schedule.eval_episodes=3", "log.progress=false", "threads=1")


def _eval_returns(run_dir: Path, *overrides: str, base: tuple[str, ...] = _CARTPOLE_STATE,
                  ) -> list[float]:
    """Train (by default on state cartpole_balance, 12k frames unless overridden); the
    evaluation returns in order."""
    Trainer(_cfg(run_dir, *base, *overrides)).train()
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [float(r["episode_return"]) for r in csv.DictReader(handle)
                if r["phase"] == "eval"]


@pytest.mark.slow
def test_cp3er_learns_cartpole_balance_from_states(tmp_path: Path) -> None:
    """Uniform random actions score ~350 here. Measured eval returns (mean of 3 episodes)
    at 4k / 8k / 12k / 16k / 20k frames with this config on 2026-11-26: seed 1: 331 / 488 /
    638 / 849 / 995, seed 2: 255 / 512 / 779 / 981 / 965, seed 3: 110 / 386 / 742 / 778 /
    871. At 12k frames seed 1 had ranged 300-925 across code versions (the run is chaotic:
    any change in RNG use moves it), hence 20k frames and a bound below every seed."""
    evals = _eval_returns(tmp_path, "agent.init_scale=0.1", "frames=20000")
    assert len(evals) == 5
    assert evals[-1] > 600, evals


@pytest.mark.slow
def test_drqv2_learns_cartpole_balance_from_states(tmp_path: Path) -> None:
    """The same check for the DrQ-v2 baseline (noise decaying over the first 3k steps,
    uniform replay sampling). Uniform random actions score ~180-370; measured eval returns
    at 4k / 8k / 12k frames on 2026-11-26: seed 1: 136 / 679 / 653, seed 2: 406 / 552 / 777,
    seed 3: 136 / 136 / 135 (stuck: this seed does not learn within 12k frames)."""
    evals = _eval_returns(tmp_path, "agent=drqv2", "agent.stddev_steps=3000")
    assert evals[-1] > 500, evals


# The CPU pixel profile (configs/profile/cpu_pixels.yaml) on a short budget: its 10k frames
# of uniform exploration (updates from 4k), 2k frames of the policy, one evaluation of 5
# episodes at 12k frames.
_SWINGUP_PIXELS_SHORT = ("+profile=cpu_pixels", "task=cartpole_swingup", "seed=1",
                         "frames=12000", "schedule.eval_every_frames=12000", "checkpoint_every=0",
                         "replay.capacity=12000", "log.video=false", "log.progress=false")


@pytest.mark.slow
def test_cp3er_learns_cartpole_swingup_from_pixels(tmp_path: Path) -> None:
    """CP3ER from pixels with the CPU pixel profile beats the uniform random policy,
    measured here on the same task (20 episodes), by a clear margin.

    Mixture critic ``init_scale`` 0.1 (the value the state checks use): with the paper's
    1e-3 the one-step policy collapses onto a constant push (75) in this budget
    (docs/results/README.md, "Diagnosis"). Measured 2026-12-01 (2-core CPU, ~35 min under
    load): random 62.9, evaluation 167.4 at 12k frames (threshold 125.9). With learning
    broken (``agent.lambda_consistency=1000``: the actor only imitates the replayed uniform
    actions) the same run fails the threshold (docs/results/README.md). With 4k frames of
    exploration instead of the profile's 10k it fails too (86.8: the policy collapses
    after its first episode)."""
    from cp3er.evaluate import random_policy_summary

    random = random_policy_summary("cartpole_swingup", episodes=20, seed=1)["return_mean"]
    evals = _eval_returns(tmp_path, "agent.init_scale=0.1", base=_SWINGUP_PIXELS_SHORT)
    assert len(evals) == 1
    assert evals[-1] > max(2.0 * random, 110.0), (evals, random)
