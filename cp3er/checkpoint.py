"""Atomic checkpoints: a checkpoint file is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "latest.pt"
REPLAY_DIR = "replay"  # checkpoints/replay/frame_<frame>/: the buffer of a checkpoint
MANIFEST = "manifest.json"  # sizes of every file of a buffer folder, checked on load


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


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / CHECKPOINT_NAME).is_file()


def save_run_checkpoint(state: dict[str, Any], run_dir: str | Path, buffer, frame: int) -> None:
    """Write a resumable checkpoint: the replay buffer, then ``latest.pt`` pointing at it.

    The buffer goes to a temporary folder renamed to ``checkpoints/replay/frame_<frame>``
    once complete; ``latest.pt`` (written atomically, naming that folder) is replaced
    only then, and older buffer folders are deleted last. A kill at any point leaves
    ``latest.pt`` naming a complete buffer folder.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    replay_root = ckpt_dir / REPLAY_DIR
    replay_root.mkdir(parents=True, exist_ok=True)
    name = f"frame_{frame:010d}"
    tmp = replay_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    buffer.dumps(tmp)
    _write_manifest(tmp)
    final = replay_root / name
    if final.exists():  # a checkpoint at the same frame (the end of a run): replace it
        stale = replay_root / f".{name}.old"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    atomic_torch_save({**state, "replay": f"{REPLAY_DIR}/{name}"}, ckpt_dir / CHECKPOINT_NAME)
    for entry in replay_root.iterdir():
        if entry.name != name:
            shutil.rmtree(entry, ignore_errors=True)


def load_run_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """The latest resumable checkpoint of ``run_dir`` and its replay-buffer folder."""
    state = load_checkpoint(Path(run_dir))
    path = checkpoint_path(Path(run_dir))
    for key in ("counters", "rng", "replay"):
        if key not in state:
            raise CheckpointError(f"{path} has no {key!r} entry: not a resumable checkpoint")
    replay = path.parent / state["replay"]
    if not replay.is_dir():
        raise CheckpointError(f"{path} names replay buffer folder {replay}, which is missing")
    _check_manifest(replay)
    return state, replay


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _write_manifest(folder: Path) -> None:
    with open(folder / MANIFEST, "w") as handle:
        json.dump(_files(folder), handle)
        handle.flush()
        os.fsync(handle.fileno())


def _check_manifest(folder: Path) -> None:
    """Every file of a buffer folder present with its written size (memmaps of a
    truncated file would otherwise load as zeros: torch extends short files)."""
    try:
        with open(folder / MANIFEST) as handle:
            expected = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"replay buffer checkpoint {folder} is unreadable: "
                              f"{MANIFEST} missing or damaged ({error})") from error
    found = _files(folder)
    bad = sorted(k for k in expected if found.get(k) != expected[k])
    if bad:
        raise CheckpointError(f"replay buffer checkpoint {folder} is unreadable: missing or "
                              f"truncated files {bad}")
