"""Checkpoints of the n-step replay buffer: TorchRL's ``dumps``/``loads`` of the filled rows,
sampler, writer and RNG, plus the ring's counters; no pickle written or read
(docs/checkpoints.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage

_COUNTERS_FILE = "nstep_buffer.json"
_PREFETCH_FILE = "prefetch.pkl"
# Every file dumps() writes (plus storage/<key>.memmap); anything else is refused: TorchRL
# would unpickle prefetch.pkl or torch.load transform.t, tensordict unpickle other.pickle.
_DUMP_FILES = ("manifest.json", _COUNTERS_FILE, "buffer_metadata.json", "writer/metadata.json",
               "sampler/proximal_sampler.pt", "storage/meta.json",
               "storage/storage_metadata.json", "rng_state/meta.json",
               "rng_state/rng_state.memmap")  # rng_state/: with a sampling generator
_TENSORDICT_TYPE = str(TensorDict)


class UnsafeBufferError(ValueError):
    """A buffer folder holding files that loading could execute (pickles)."""


class BufferCheckpoint:
    """:class:`~cp3er.replay.buffer.NStepReplayBuffer`'s checkpoint half."""

    def _keep_filled_rows(self, storage: LazyTensorStorage) -> None:
        """Checkpoint the filled rows only (storage-checkpointer hooks; registered after
        ``ReplayBuffer()``, which installs the checkpointer)."""
        storage.register_save_hook(_filled_rows(storage))
        storage.register_load_hook(_into_storage(storage))

    def _counters(self) -> dict[str, Any]:
        return {
            "written": self._written,
            "head_slot": self._head_slot,
            "last_episode": self._last_episode,
            "pending": self._pending,
            "config": {
                "capacity": self.capacity,
                "obs_key": self.obs_key,
                "frame_stack": self.frame_stack,
            },
        }

    def _load_counters(self, counters: dict[str, Any]) -> None:
        config = counters["config"]
        mine = self._counters()["config"]
        if config != mine:
            raise ValueError(f"checkpoint of a buffer built with {config}, this one has {mine}")
        self._written = int(counters["written"])
        self._head_slot = int(counters["head_slot"])
        self._last_episode = int(counters["last_episode"])
        pending = counters["pending"]
        self._pending = None if pending is None else {k: int(v) for k, v in pending.items()}

    def state_dict(self) -> dict[str, Any]:
        """Storage, sampler, writer, RNG and episode counters (holds the storage's tensors)."""
        return {"rb": self._rb.state_dict(), "counters": self._counters()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` from any device; sampling continues exactly."""
        self._load_counters(state_dict["counters"])
        storage = self._rb.storage
        rb_state = state_dict["rb"]
        saved = rb_state["_storage"]["_storage"]
        if saved:
            # On this storage's device (tensordict refuses another's), into a storage
            # allocated first (else a LazyMemmapStorage would memmap into a temporary dir).
            rows = TensorDict().load_state_dict(saved, strict=False).to(self.storage_device)
            if not storage.initialized:
                storage._init(rows[0])
            rb_state = {**rb_state, "_storage": {**rb_state["_storage"],
                                                 "_storage": rows.state_dict()}}
        self._rb.load_state_dict(rb_state)

    def dumps(self, path: str | Path) -> None:
        """Checkpoints the whole buffer under folder ``path`` (TorchRL's ``dumps``).

        The folder is the same whatever the storage device. TorchRL 0.14 always pickles its
        (here empty) prefetch queue to ``prefetch.pkl``: removed, so no pickle is written.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._rb.dumps(path)
        (path / _PREFETCH_FILE).unlink(missing_ok=True)
        with open(path / _COUNTERS_FILE, "w") as file:
            json.dump(self._counters(), file)

    def _tensor_nbytes(self) -> list[int]:
        storage = self._rb.storage
        if not storage.initialized:
            return [0]
        rows = len(storage)
        return [t[:rows].numel() * t.element_size() for t in storage._storage.values(True, True)]

    def dump_nbytes(self) -> int:
        """Bytes :meth:`dumps` writes (about)."""
        return sum(self._tensor_nbytes()) + (1 << 20)

    def dump_largest(self) -> int:
        """Bytes of the largest file :meth:`dumps` writes."""
        return max(self._tensor_nbytes())

    def loads(self, path: str | Path) -> None:
        """Restores a buffer written by :meth:`dumps`; sampling continues exactly.

        Refuses any file :meth:`dumps` does not write and metadata naming a tensorclass
        (tensordict would import its module).
        """
        path = Path(path)
        if (path / "streams.json").is_file():  # cp3er.replay.streams' layout
            raise ValueError(f"replay buffer folder {path} holds one stream per collector "
                             "worker (a run with collector.workers > 1); this run has one")
        _check_dump_files(path)
        with open(path / _COUNTERS_FILE) as file:
            self._load_counters(json.load(file))
        storage = self._rb.storage
        if not storage.initialized and (path / "storage" / "meta.json").is_file():
            # allocate the full capacity from the saved layout; the load hook copies rows in
            storage._init(TensorDict.load_memmap(path / "storage")[0])
        self._rb.loads(path)


def _filled_rows(storage: LazyTensorStorage):
    """Storage save hook: the filled rows."""
    def hook(data: TensorDictBase, path: Path) -> TensorDictBase:
        return data[: len(storage)]
    return hook


def _into_storage(storage: LazyTensorStorage):
    """Storage load hook: the saved rows copied into the allocated storage's first rows
    (TorchRL then copies the returned tensors onto themselves, a no-op)."""
    def hook(saved: TensorDictBase, out: TensorDictBase) -> TensorDictBase:
        rows = saved.shape[0]
        if rows > out.shape[0]:
            raise ValueError(f"the saved storage has {rows} rows, more than this buffer's "
                             f"capacity {out.shape[0]}")
        out[:rows].update_(saved)
        return out
    return hook


def _check_dump_files(path: Path) -> None:
    """:class:`UnsafeBufferError` for a file ``dumps`` does not write, or metadata that
    would make tensordict import a module."""
    names = [str(p.relative_to(path)) for p in sorted(path.rglob("*")) if p.is_file()]
    unknown = [n for n in names if n not in _DUMP_FILES
               and not re.fullmatch(r"storage/\w+\.memmap", n)]
    if unknown:
        raise UnsafeBufferError(
            f"replay buffer folder {path} holds files a cp3er buffer does not write "
            f"({', '.join(unknown)}); a pickle there could run code when loaded")
    for name in ("storage/meta.json", "rng_state/meta.json"):
        if not (path / name).is_file():
            continue
        with open(path / name) as file:
            meta = json.load(file)
        if meta.get("_type") != _TENSORDICT_TYPE or "_tensorclass_type" in meta:
            raise UnsafeBufferError(f"replay buffer folder {path}: {name} names type "
                                    f"{meta.get('_type')!r}, not {_TENSORDICT_TYPE!r}")
