"""Checkpoints that are complete or absent, verified on load, and never run code.

``latest.pt`` (format 2): ``{"cp3er_format": 2, "xxh3_128": ..., "payload": uint8 tensor}``
around a ``torch.save`` of the state, both loaded weights-only; the buffer folder
``checkpoints/replay/<name>/`` has a ``manifest.json`` of sizes and hashes. XXH3-128 detects
accidental corruption, not forgery. Older formats are refused (docs/checkpoints.md).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import resource
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

CHECKPOINT_NAME = "latest.pt"
REPLAY_DIR = "replay"  # checkpoints/replay/<name>/: the buffer of a checkpoint
MANIFEST = "manifest.json"  # size and content hash of every file of a buffer folder
HASH = "xxh3_128"  # the content hash written and verified
FORMAT = 2  # 1 (no field): pickled torch.save, size-only manifest
OLD_FORMAT = ("this cp3er reads checkpoint format 2 hashed with xxh3_128 only; start a new "
              "run_dir (or load it with the cp3er version that wrote it)")
_CHUNK = 1 << 24
_MARGIN = 16 << 20  # bytes of free disk kept beyond a checkpoint's estimated size


class CheckpointError(RuntimeError):
    """A missing, unreadable, corrupted or mismatched checkpoint, or one not writable."""


class UnsafePathError(CheckpointError):
    """A symlink in a run folder, or a checkpoint path that leaves it."""


def refuse_links(run_dir: Path, names: tuple[str, ...]) -> None:
    """:class:`UnsafePathError` if any of ``names`` (relative to ``run_dir``) is a symlink."""
    for name in names:
        if (run_dir / name).is_symlink():
            raise UnsafePathError(f"{run_dir / name} is a symlink (to "
                                  f"{os.readlink(run_dir / name)}); a run folder's files must "
                                  "be its own: remove the link")


# -- files -------------------------------------------------------------------------------
def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` to a temporary file, fsync, ``os.replace``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # never through a symlink planted at the temporary's name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePathError(f"{tmp} is a symlink; refusing to write through it "
                                  "(a run folder's files must be its own: remove the link)"
                                  ) from None
        raise
    with os.fdopen(fd, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def hash_bytes(data: Any) -> str:
    """XXH3-128 hex digest of a bytes-like object."""
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path, fsync: bool = False) -> str:
    """XXH3-128 hex digest of a file's content (``fsync``: also flush it to disk)."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


# -- latest.pt ---------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` (tensors and plain containers) as a format-2 checkpoint file."""
    payload = io.BytesIO()
    torch.save(obj, payload)
    data = payload.getbuffer()
    envelope = {"cp3er_format": FORMAT, HASH: hash_bytes(data),
                "payload": torch.frombuffer(data, dtype=torch.uint8)}
    atomic_write(path, lambda handle: torch.save(envelope, handle))


def checkpoint_path(target: str | Path) -> Path:
    """A run folder -> its latest checkpoint; a file -> itself. Raises if absent."""
    target = Path(target)
    path = target / "checkpoints" / CHECKPOINT_NAME if target.is_dir() else target
    if target.is_dir():
        refuse_links(target, ("checkpoints", f"checkpoints/{CHECKPOINT_NAME}"))
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path} (give a run folder with checkpoints/{CHECKPOINT_NAME} "
            "or a .pt file written by cp3er-train)"
        )
    return path


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


_FAILED_UPDATE = re.compile(r"Failed to update '([^']+)' in tensordict")


def load_error_detail(error: BaseException) -> str:
    """One line for a ``load_state_dict`` error: tensordict's nested "Failed to update ..."
    dumps become ``trunk.0.weight: <root cause>``."""
    keys: list[str] = []
    cause: BaseException | None = error
    while cause is not None and (match := _FAILED_UPDATE.match(str(cause))):
        keys.append(match.group(1))
        cause = cause.__cause__ or cause.__context__
    if not keys:
        return first_line(error)
    return ".".join(keys) + (f": {first_line(cause)}" if cause is not None else
                             ": shapes or entries differ")


def _unwrap(outer: Any, path: Path) -> Any:
    if not (isinstance(outer, dict) and "cp3er_format" in outer):
        raise CheckpointError(f"checkpoint {path} is in checkpoint format 1 (no content hash); "
                              f"{OLD_FORMAT}")
    if outer["cp3er_format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {outer['cp3er_format']!r}; this "
                              f"cp3er reads format {FORMAT}")
    if HASH not in outer:
        raise CheckpointError(f"checkpoint {path} has no {HASH} hash (format 2 hashed with "
                              f"SHA-256, or damaged); {OLD_FORMAT}")
    payload = outer.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise CheckpointError(f"checkpoint {path} is corrupted: no payload")
    data = payload.numpy()
    if hash_bytes(data) != outer[HASH]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its content does not match "
                              f"the hash ({HASH}) written with it")
    return _weights_only(io.BytesIO(data.tobytes()), path)


def _weights_only(source: Path | io.BytesIO, path: Path) -> Any:
    """``torch.load(weights_only=True)``; one-line :class:`CheckpointError` for pickled
    objects (format 1) or a damaged file."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        if isinstance(source, io.BytesIO):
            source.seek(0)
        try:
            pickled = list(torch.serialization.get_unsafe_globals_in_checkpoint(source))
        except Exception:  # damaged: not even its pickle's imports can be listed
            pickled = []
        if pickled:
            raise CheckpointError(f"checkpoint {path} holds pickled Python objects "
                                  f"({', '.join(pickled[:4])}): checkpoint format 1, or not "
                                  f"written by cp3er; refused (loading could run code); "
                                  f"{OLD_FORMAT}") from None
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupted: "
                              f"{first_line(error)}") from error


def load_checkpoint(target: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_torch_save`: weights-only, hash verified."""
    path = checkpoint_path(target)
    state = _unwrap(_weights_only(path, path), path)
    if not isinstance(state, dict) or "agent" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a cp3er checkpoint (no agent/config entries)")
    return state


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / CHECKPOINT_NAME).is_file()


# -- a run's checkpoint: replay buffer folder + latest.pt --------------------------------
def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def check_room(folder: Path, needed: int, largest_file: int) -> None:
    """Refuse a write past the free disk or ``ulimit -f`` (a memmap write would die of
    SIGBUS, without a message)."""
    free = shutil.disk_usage(folder).free
    if free < needed + _MARGIN:
        raise CheckpointError(
            f"not enough free disk space for a checkpoint in {folder}: it needs "
            f"{(needed + _MARGIN) / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and largest_file > limit:
        raise CheckpointError(
            f"the file-size limit (ulimit -f) is {limit} bytes; a checkpoint in {folder} "
            f"writes a file of {largest_file} bytes"
        )


def _fresh_name(replay_root: Path, frame: int) -> str:
    """``frame_<frame>``, or ``frame_<frame>_<k>`` if taken: never an existing folder."""
    base = name = f"frame_{frame:010d}"
    k = 0
    while (replay_root / name).exists():
        k += 1
        name = f"{base}_{k}"
    return name


def save_run_checkpoint(state: dict[str, Any], run_dir: str | Path, buffer, frame: int) -> None:
    """Write the replay buffer to a fresh folder, then ``latest.pt`` naming it, then delete
    older folders: ``latest.pt`` always names a complete buffer (docs/checkpoints.md)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    replay_root = ckpt_dir / REPLAY_DIR
    # the old buffer folders are deleted below: never those of a folder linked from here
    refuse_links(Path(run_dir), ("checkpoints", f"checkpoints/{REPLAY_DIR}"))
    replay_root.mkdir(parents=True, exist_ok=True)
    state_bytes = _nbytes(state)
    check_room(ckpt_dir, buffer.dump_nbytes() + 2 * state_bytes,
               max(buffer.dump_largest(), state_bytes))
    for entry in replay_root.iterdir():  # temporaries of a killed write: never named
        if entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)
    name = _fresh_name(replay_root, frame)
    tmp = replay_root / f".{name}.tmp"
    buffer.dumps(tmp)
    _write_manifest(tmp)
    os.replace(tmp, replay_root / name)
    fsync_dir(replay_root)
    atomic_torch_save({**state, "replay": f"{REPLAY_DIR}/{name}"}, ckpt_dir / CHECKPOINT_NAME)
    for entry in replay_root.iterdir():
        if entry.name != name:
            shutil.rmtree(entry, ignore_errors=True)


def load_run_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """The latest resumable checkpoint of ``run_dir`` and its verified buffer folder."""
    state = load_checkpoint(Path(run_dir))
    path = checkpoint_path(Path(run_dir))
    for key in ("counters", "rng", "replay"):
        if key not in state:
            raise CheckpointError(f"{path} has no {key!r} entry: not a resumable checkpoint")
    name = _replay_name(state["replay"], path)
    refuse_links(Path(run_dir), (f"checkpoints/{REPLAY_DIR}", f"checkpoints/{name}"))
    replay = path.parent / name
    if not replay.is_dir():
        raise CheckpointError(f"{path} names replay buffer folder {replay}, which is missing")
    check_manifest(replay)
    return state, replay


def _replay_name(name: Any, path: Path) -> str:
    """A checkpoint's ``replay/<folder>`` entry; :class:`UnsafePathError` for a path outside."""
    parts = name.split("/") if isinstance(name, str) else []
    if (len(parts) != 2 or parts[0] != REPLAY_DIR or parts[1] in ("", ".", "..")
            or "\\" in parts[1] or name.startswith("/")):
        raise UnsafePathError(f"{path} names replay buffer folder {name!r}, which is not a "
                              f"folder of {path.parent / REPLAY_DIR}; refused")
    return name


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]


def _write_manifest(folder: Path) -> None:
    """Hash and fsync every file, fsync every folder, then write the manifest."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size,
                                          HASH: hash_file(p, fsync=True)}
             for p in _files(folder)}
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(sub)
    with open(folder / MANIFEST, "w") as handle:
        json.dump({"format": FORMAT, "files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(folder)


def check_manifest(folder: Path) -> None:
    """Every file of a buffer folder present with its size and hash, and no other (torch
    would load a truncated memmap padded with zeros)."""
    try:
        with open(folder / MANIFEST) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"replay buffer checkpoint {folder} is unreadable: "
                              f"{MANIFEST} missing or damaged ({error})") from error
    links = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink())
    if links:
        raise UnsafePathError(f"replay buffer checkpoint {folder} holds symlinks {links}; a "
                              "checkpoint's files must be its own")
    found = {str(p.relative_to(folder)): p for p in _files(folder)}
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT):
        raise CheckpointError(f"replay buffer checkpoint {folder} is in checkpoint format 1 "
                              f"(a manifest of sizes only); {OLD_FORMAT}")
    expected = manifest.get("files", {})
    unhashed = sorted(k for k, v in expected.items() if HASH not in v)
    if unhashed:
        raise CheckpointError(f"replay buffer checkpoint {folder} lists {unhashed[:3]} without "
                              f"an {HASH} hash (format 2 hashed with SHA-256, or damaged); "
                              f"{OLD_FORMAT}")
    bad = sorted(k for k in expected
                 if k not in found or found[k].stat().st_size != expected[k].get("size"))
    if bad:
        raise CheckpointError(f"replay buffer checkpoint {folder} is unreadable: missing or "
                              f"truncated files {bad}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"replay buffer checkpoint {folder} holds files its manifest "
                              f"does not list: {extra}")
    damaged = sorted(k for k, v in expected.items() if hash_file(found[k]) != v[HASH])
    if damaged:
        raise CheckpointError(f"replay buffer checkpoint {folder} is corrupted: the content "
                              f"of {damaged} does not match its hash in {MANIFEST}")
