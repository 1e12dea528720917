"""Atomic checkpoints: a checkpoint file is either complete or absent, never half-written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "latest.pt"


class CheckpointError(RuntimeError):
    """A missing, unreadable or mismatched checkpoint."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``:
    the previous file stays valid until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def checkpoint_path(target: str | Path) -> Path:
    """A run folder -> its latest checkpoint; a file -> itself. Raises if absent."""
    target = Path(target)
    path = target / "checkpoints" / CHECKPOINT_NAME if target.is_dir() else target
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path} (give a run folder with checkpoints/{CHECKPOINT_NAME} "
            "or a .pt file written by cp3er-train)"
        )
    return path


def load_checkpoint(target: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_torch_save`, with a clear error if broken."""
    path = checkpoint_path(target)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupted: {error}") from error
    if not isinstance(state, dict) or "agent" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a cp3er checkpoint (no agent/config entries)")
    return state
