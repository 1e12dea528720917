"""Hydra configs: one file per registered task holding only deltas, and they compose."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_run import random_state_batch

from envs import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_registered_task_has_a_config_and_nothing_else() -> None:
    files = {p.stem for p in (CONFIGS / "task").glob("*.yaml")}
    assert files == set(TASKS)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("cheetah_run", {"frames": 3_100_000, "lr": 1e-4, "feature_dim": 50, "batch_size": 256}),
        ("dog_run", {"frames": 30_100_000, "lr": 8e-5, "feature_dim": 100}),
        ("humanoid_walk", {"lr": 8e-5, "feature_dim": 100}),
        ("walker_run", {"batch_size": 512, "n_step": 1}),
        ("mw_assembly", {"frames": 3_100_000, "n_step": 3}),
        ("cartpole_balance", {"frames": 1_100_000}),
    ],
)
def test_task_deltas_compose(task: str, expected: dict) -> None:
    cfg = _compose(f"task={task}")
    assert cfg.task_name == task
    for key, value in expected.items():
        assert cfg[key] == value, key


def test_quadruped_run_replay_capacity_delta_keeps_other_replay_keys() -> None:
    cfg = _compose("task=quadruped_run")
    assert cfg.replay.capacity == 100_000
    assert cfg.replay.sampler == "proximal" and cfg.replay.alpha == 2.0


@pytest.mark.parametrize(("agent", "sampler"), [("cp3er", "proximal"), ("drqv2", "uniform")])
def test_each_agent_samples_replay_its_own_way(agent: str, sampler: str) -> None:
    """PPE is CP3ER's; the DrQ-v2 baseline samples uniformly, as its paper and code do,
    also on tasks whose file changes other replay keys."""
    for task in ("cheetah_run", "quadruped_run"):
        cfg = _compose(f"agent={agent}", f"task={task}")
        assert cfg.replay.sampler == sampler
        assert cfg.replay.alpha == 2.0


@pytest.mark.parametrize("agent", ["cp3er", "drqv2"])
@pytest.mark.parametrize("task", ["cartpole_swingup", "walker_run"])
def test_cpu_pixel_profile_overrides_task_sizes_for_every_agent(agent: str, task: str) -> None:
    from cp3er.config_check import validate_config

    cfg = _compose(f"task={task}", f"agent={agent}", "+profile=cpu_pixels")
    validate_config(cfg)
    assert cfg.agent.name == agent and cfg.obs == "pixels"
    # the profile's departures win over the task file (walker_run: batch 512, n_step 1)
    assert (cfg.frames, cfg.batch_size, cfg.threads) == (60_000, 32, 1)
    assert cfg.replay.capacity >= cfg.frames // cfg.env.action_repeat  # never overwrites
    assert cfg.schedule.eval_episodes == 5
    # the rest stays the paper's / the task's
    assert (cfg.hidden_dim, cfg.lr, cfg.env.image_size) == (1024, 1e-4, 84)
    assert cfg.n_step == (1 if task == "walker_run" else 3)
    assert cfg.replay.sampler == ("proximal" if agent == "cp3er" else "uniform")


@pytest.mark.parametrize("clip_outputs", [True, False])
def test_consistency_clip_outputs_reaches_the_loss(clip_outputs: bool) -> None:
    from agents.build import build_agent
    from envs import make_env

    cfg = _compose("task=cartpole_swingup", "obs=state", "hidden_dim=32",
                   f"agent.consistency.clip_outputs={str(clip_outputs).lower()}")
    env = make_env("cartpole_swingup", "state")
    agent = build_agent(cfg, env)
    env.close()
    assert agent.loss.consistency_loss.clip_outputs is clip_outputs


def test_distillation_agent_updates_and_its_teacher_survives_a_checkpoint(tmp_path) -> None:
    """``agent.consistency.loss=distillation``: the agent gets a teacher with its own
    optimiser, an update steps it (and the actor); a checkpoint written and loaded the way
    ``cp3er-train`` does restores the teacher and its optimiser: same outputs, and the next
    update from both agents is identical."""
    from agents.build import build_agent
    from cp3er.checkpoint import atomic_torch_save, load_checkpoint
    from cp3er.consistency import ConsistencyDistillationLoss
    from envs import make_env

    cfg = _compose("task=cartpole_swingup", "obs=state", "hidden_dim=32", "batch_size=8",
                   "agent.consistency.loss=distillation", "agent.consistency.solver=heun")
    env = make_env("cartpole_swingup", "state")
    obs_dim = env.observation_spec["observation"].shape[-1]
    torch.manual_seed(0)
    agent = build_agent(cfg, env)
    assert isinstance(agent.loss.consistency_loss, ConsistencyDistillationLoss)
    assert agent.loss.consistency_loss.solver == "heun"
    assert set(agent.optimizers) == {"critic", "actor", "teacher"}
    batch = random_state_batch(obs_dim)
    teacher = agent.loss.teacher
    before = [p.detach().clone() for p in teacher.parameters()]
    actor_before = [p.detach().clone() for p in agent.loss.actor.parameters()]
    metrics = agent.update(batch.clone())
    assert {"loss_critic", "loss_teacher", "loss_actor"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, teacher.parameters(), strict=True))
    assert any(not torch.equal(b, p)
               for b, p in zip(actor_before, agent.loss.actor.parameters(), strict=True))

    atomic_torch_save({"agent": agent.state_dict(), "config": {}}, tmp_path / "latest.pt")
    torch.manual_seed(123)  # another initialisation
    restored = build_agent(cfg, env)
    env.close()
    x, cond = torch.randn(8, 1), torch.randn(8, obs_dim)
    assert not torch.allclose(restored.loss.teacher(x, 3.0, cond), teacher(x, 3.0, cond))
    restored.load_state_dict(load_checkpoint(tmp_path / "latest.pt")["agent"])
    torch.testing.assert_close(restored.loss.teacher(x, 3.0, cond), teacher(x, 3.0, cond),
                               rtol=0, atol=0)
    assert restored.optimizers["teacher"].state_dict()["state"]  # Adam moments restored
    for model in (agent, restored):
        torch.manual_seed(7)
        model.update(batch.clone())
    for a, b in zip(agent.loss.teacher.parameters(), restored.loss.teacher.parameters(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ema_target_moves_after_each_actor_step_and_is_checkpointed() -> None:
    """``agent.consistency.ema_decay``: the consistency target is an EMA copy of the actor's
    denoiser, ``p_ema <- d p_ema + (1 - d) p`` after the actor step; it is part of the
    agent's state dict. Without it (the reference) there is no copy."""
    from agents.build import build_agent
    from envs import make_env

    cfg = _compose("task=cartpole_swingup", "obs=state", "hidden_dim=32", "batch_size=8",
                   "agent.consistency.ema_decay=0.9")
    env = make_env("cartpole_swingup", "state")
    torch.manual_seed(0)
    agent = build_agent(cfg, env)
    ema, online = agent.loss.ema_denoiser, agent.loss.policy.denoiser
    before = [p.detach().clone() for p in ema.module.parameters()]
    agent.update(random_state_batch(env.observation_spec["observation"].shape[-1]))
    for old, new, moved in zip(before, online.parameters(), ema.module.parameters(),
                               strict=True):
        torch.testing.assert_close(moved, 0.9 * old + 0.1 * new.detach())
    assert any("ema_denoiser" in k for k in agent.state_dict()["loss"])
    cfg.agent.consistency.ema_decay = None  # the reference: no copy
    plain = build_agent(cfg, env)
    assert plain.loss.ema_denoiser is None
    assert not any("ema_denoiser" in k for k in plain.state_dict()["loss"])
