"""Shared test settings: headless rendering and deterministic, single-threaded torch."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
# Two test workers share two cores: more than one OpenMP thread per process makes tiny
# ops ~100x slower under contention. Subprocesses (cp3er-train in tests) inherit this.
os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path

import pytest
import torch

import cp3er.config_schema  # noqa: F401  (Hydra's ConfigStore: the run and agent schemas)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run two per machine (pytest-xdist): one torch thread each avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny state run (400 frames, one checkpoint), one per test module."""
    from tiny_run import tiny_cfg

    from cp3er.train import Trainer

    run = tmp_path_factory.mktemp("finished") / "run"
    Trainer(tiny_cfg(run, "frames=400")).train()
    return run
