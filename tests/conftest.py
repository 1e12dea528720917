"""Shared test settings: headless rendering and deterministic, single-threaded torch."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run two per machine (pytest-xdist): one torch thread each avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
