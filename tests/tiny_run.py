"""A tiny state run for tests of the training loop: a Hydra config and a command line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict

from cp3er.config_schema import CONFIG_DIR

TINY_STATE = [
    "task=cartpole_balance", "obs=state", "hidden_dim=32", "feature_dim=16", "batch_size=16",
    "replay.capacity=5000", "schedule.seed_frames=200", "schedule.explore_frames=200",
    "schedule.eval_every_frames=0", "schedule.eval_episodes=1", "log.progress=false",
]


def tiny_cfg(run_dir: Path, *overrides: str):
    """The composed config of a tiny state run in ``run_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config",
                       overrides=[f"run_dir={run_dir}", *TINY_STATE, *overrides])


def tiny_command(run_dir: Path, *overrides: str) -> list[str]:
    """``cp3er-train`` of a tiny state run, as a subprocess command."""
    return [sys.executable, "-m", "cp3er.train_cli", f"run_dir={run_dir}", *TINY_STATE, *overrides]


def random_state_batch(obs_dim: int, action_dim: int = 1, size: int = 8,
                       seed: int = 1) -> TensorDict:
    """A replay batch of random states and actions in [-1, 1] (n-step fields filled), for
    agent updates outside a run."""
    gen = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": torch.randn(size, obs_dim, generator=gen),
        "action": torch.rand(size, action_dim, generator=gen) * 2 - 1,
        "next": {"observation": torch.randn(size, obs_dim, generator=gen),
                 "reward": torch.rand(size, 1, generator=gen),
                 "discount": torch.full((size, 1), 0.97)}}, [size])


def floats(metrics: dict) -> dict[str, float]:
    """An update's metrics (0-d tensors) as floats, to compare updates."""
    return {name: float(value) for name, value in metrics.items()}


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll ``predicate`` until it holds while ``process`` (a run with ``stderr=PIPE``)
    runs; fails with its stderr's tail if it ends first, kills it on ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)
