"""Shared test settings: headless rendering and deterministic, single-threaded torch."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
# Two test workers share two cores: more than one OpenMP thread per process makes tiny
# ops ~100x slower under contention. Subprocesses (cp3er-train in tests) inherit this.
os.environ["OMP_NUM_THREADS"] = "1"

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
