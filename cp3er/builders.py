"""Build a run's parts from its config: environments, agent, replay; restore checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agents.agent import Agent
from agents.build import build_agent
from cp3er.checkpoint import CheckpointError, first_line, load_checkpoint, load_error_detail
from cp3er.choices import obs_key_for
from cp3er.config_schema import complete_run_config
from cp3er.replay import make_replay_buffer
from cp3er.run_state import seed_everything
from envs import TASKS, make_env

EVAL_SEED_OFFSET = 10_000
#: collector worker ``k`` (``collector.workers > 1``) seeds its env and RNGs with
#: ``seed + k * WORKER_SEED_OFFSET`` (plus the agent step when a run resumes).
WORKER_SEED_OFFSET = 100_000


def env_overrides(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.env).items() if v is not None}


def make_train_env(cfg: DictConfig):
    return make_env(cfg.task_name, str(cfg.obs), seed=cfg.seed, **env_overrides(cfg))


def worker_env_factories(cfg: DictConfig, seed: int) -> list[functools.partial]:
    """One picklable env factory per collector worker (``collector.workers``): worker ``k``
    builds the training env seeded ``seed + k * WORKER_SEED_OFFSET`` in its own process."""
    return [functools.partial(_worker_env, cfg.task_name, str(cfg.obs),
                              seed + k * WORKER_SEED_OFFSET, env_overrides(cfg))
            for k in range(cfg.collector.workers)]


def _worker_env(task: str, obs: str, seed: int, overrides: dict):
    """A collector worker's env, built in the spawned worker, which it also seeds (else every
    worker would start from torch's same default seed)."""
    seed_everything(seed)
    return make_env(task, obs, seed=seed, **overrides)


def make_eval_env(cfg: DictConfig, seed: int | None = None):
    """A separate environment whose transitions never enter the replay buffer."""
    seed = cfg.seed + EVAL_SEED_OFFSET if seed is None else seed
    return make_env(cfg.task_name, str(cfg.obs), seed=seed, **env_overrides(cfg))


def make_buffer(cfg: DictConfig, run_dir: Path):
    """The run's replay buffer; ``replay.sampler=reference`` assumes, like the reference code,
    an episode's environment steps as its transitions, whatever the action repeat."""
    frame_stack = cfg.env.frame_stack if cfg.obs == "pixels" else 1
    return make_replay_buffer(
        cfg.replay.capacity,
        streams=cfg.collector.workers,
        obs_key=obs_key_for(cfg.obs),
        frame_stack=frame_stack,
        n_step=cfg.n_step,
        gamma=cfg.gamma,
        batch_size=cfg.batch_size,
        sampler=str(cfg.replay.sampler),
        alpha=cfg.replay.alpha,
        transitions_per_episode=TASKS[cfg.task_name].episode_env_steps,
        storage=str(cfg.replay.storage),
        scratch_dir=run_dir / "replay" if cfg.replay.storage == "memmap" else None,
        storage_device=str(cfg.replay.device),
    )


def load_agent_for_eval(target: str | Path, seed: int,
                        device: str = "cpu") -> tuple[DictConfig, object, Agent]:
    """Config, a fresh evaluation env and the agent restored from ``target`` onto ``device``."""
    return restore_agent_for_eval(load_checkpoint(target), seed, device)


def checkpoint_frame(state: dict) -> int:
    """The environment frame a loaded run checkpoint was written at."""
    return int(state["counters"]["step"]) * int(state["config"]["env"]["action_repeat"])


def restore_agent_for_eval(state: dict, seed: int, device: str = "cpu"
                           ) -> tuple[DictConfig, object, Agent]:
    """:func:`load_agent_for_eval` from a loaded checkpoint, so weights and counters come from
    the same one even while a run keeps writing."""
    try:
        cfg = complete_run_config(state["config"])
    except (ValueError, KeyError, OmegaConfBaseException) as error:  # ValidationError, ...
        raise CheckpointError(f"the checkpoint's config is not a valid run config: "
                              f"{first_line(error)}") from None
    env = make_eval_env(cfg, seed=seed)
    agent = build_agent(cfg, env, device)
    try:
        agent.load_state_dict(state["agent"])
    except (RuntimeError, KeyError, ValueError) as error:  # tensordict raises ValueError
        env.close()
        raise CheckpointError(
            f"checkpoint does not match the {cfg.agent.name} agent for task {cfg.task_name} "
            f"({cfg.obs}): {load_error_detail(error)}"
        ) from error
    agent.loss.eval()
    return cfg, env, agent
