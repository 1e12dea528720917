"""Replay fed by several collector workers: one n-step ring (a "stream") per worker, so no
frame stack or n-step window mixes two workers' transitions; a batch is split across the
rings by their sampling mass. Routing and exactness: docs/implementation.md, "The replay
buffer" (streams)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase

from cp3er.replay.buffer import NStepReplayBuffer
from cp3er.replay.dump import UnsafeBufferError

__all__ = ["StreamedReplayBuffer"]

_LAYOUT_FILE = "streams.json"
_STREAM_DIR = "stream_{}"


class StreamedReplayBuffer:
    """``streams`` n-step ring buffers behind the interface of one.

    Args:
        capacity: storage rows in all; each stream holds ``capacity // streams``.
        streams: number of rings (one per collector worker).
        generator: optional ``torch.Generator`` for the split and each stream's draws.
        **kwargs: the other arguments of :class:`NStepReplayBuffer`, for every stream.

    Examples:
        >>> rb = StreamedReplayBuffer(100_000, streams=2, obs_key="observation",
        ...                           frame_stack=1, n_step=3, batch_size=256)
        >>> # for batch in multi_sync_collector: rb.extend(batch)   # [workers, T]
        >>> # batch = rb.sample()
    """

    def __init__(self, capacity: int, streams: int, *,
                 generator: torch.Generator | None = None, **kwargs: Any) -> None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        per_stream = int(capacity) // int(streams)
        if per_stream < 2:
            raise ValueError(f"capacity {capacity} leaves {per_stream} rows to each of the "
                             f"{streams} streams; each needs >= 2")
        self.streams = [NStepReplayBuffer(per_stream, generator=generator, **kwargs)
                        for _ in range(streams)]
        self.stream_capacity = per_stream
        self.capacity = per_stream * streams
        self.batch_size = self.streams[0].batch_size
        self.device = self.streams[0].device
        self._generator = generator
        self.episode_ends = torch.zeros(0, 0, dtype=torch.bool)  # of the last batch written

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams)

    @property
    def write_count(self) -> int:
        """Rows written since creation, all streams."""
        return sum(s.write_count for s in self.streams)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(streams={len(self.streams)}, capacity={self.capacity}, "
                f"rows={len(self)}, stream={self.streams[0]!r})")

    # ------------------------------------------------------------------------ write
    def extend(self, batch: TensorDictBase) -> torch.Tensor:
        """Writes a ``[workers, T]`` batch (row ``k`` to stream ``k``) or a ``[T]`` async chunk
        (:meth:`_route`). Returns the slots in the whole buffer's numbering
        (``k * stream_capacity + i``) and sets :attr:`episode_ends`."""
        if batch.batch_dims == 1:
            batch = batch.unsqueeze(0)
        if batch.batch_dims != 2:
            raise ValueError(f"{type(self).__name__} takes [T] or [workers, T] batches; got "
                             f"batch shape {batch.shape}")
        stacked = batch.shape[0] > 1
        if stacked and batch.shape[0] != len(self.streams):
            raise ValueError(f"a [workers, T] batch of {batch.shape[0]} workers for "
                             f"{len(self.streams)} streams (collector.workers)")
        slots, ends = [], []
        for row, chunk in enumerate(batch.unbind(0)):
            if chunk.shape[0] == 0:
                ends.append(torch.zeros(0, dtype=torch.bool))
                continue
            k = row if stacked else self._route(chunk)
            slots.append(self.streams[k].extend(chunk) + k * self.stream_capacity)
            ends.append(self.streams[k].episode_ends)
        self.episode_ends = torch.stack(ends)
        return torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)

    def _route(self, chunk: TensorDictBase) -> int:
        """The stream whose episode in progress the chunk continues, else the emptiest free
        one."""
        traj = chunk.get(("collector", "traj_ids"), None)
        if traj is None:
            if len(self.streams) == 1:
                return 0
            raise ValueError("a StreamedReplayBuffer needs the collector's "
                             "('collector', 'traj_ids') to keep workers' episodes apart")
        first = int(traj.reshape(-1)[0])
        for k, stream in enumerate(self.streams):
            if stream.pending_traj == first:
                return k
        free = [k for k, stream in enumerate(self.streams) if stream.pending_traj is None]
        if not free:
            raise ValueError(
                f"a chunk starting trajectory {first} continues none of the "
                f"{len(self.streams)} streams' episodes in progress and no stream is free: "
                "more collector workers than replay streams?")
        return min(free, key=lambda k: (self.streams[k].write_count, k))

    def cut_episode(self) -> None:
        """:meth:`NStepReplayBuffer.cut_episode` of every stream."""
        for stream in self.streams:
            stream.cut_episode()

    def empty(self) -> None:
        for stream in self.streams:
            stream.empty()

    # ------------------------------------------------------------------------- read
    def sample(self, batch_size: int | None = None) -> TensorDictBase:
        """A batch split across the streams by mass; keys of :meth:`NStepReplayBuffer.sample`
        plus ``stream``; ``index`` in the whole buffer's numbering, ``age`` in its ring."""
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        masses = torch.tensor([s.sampling_mass() for s in self.streams], dtype=torch.float64)
        if not bool(masses.sum() > 0):
            raise RuntimeError("The replay buffer is empty.")
        pick = torch.multinomial(masses, batch_size, replacement=True,
                                 generator=self._generator)
        counts = torch.bincount(pick, minlength=len(self.streams)).tolist()
        parts = []
        for k, (stream, count) in enumerate(zip(self.streams, counts, strict=True)):
            if count == 0:
                continue
            part = stream.sample(count)
            part["index"] = part["index"] + k * self.stream_capacity
            part["stream"] = torch.full((count,), k, dtype=torch.long, device=part.device)
            parts.append(part)
        return torch.cat(parts, 0)

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict[str, int]:
        return {"streams": len(self.streams), "stream_capacity": self.stream_capacity}

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self._layout(), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_layout(state_dict.get("layout"), "state")
        for stream, state in zip(self.streams, state_dict["streams"], strict=True):
            stream.load_state_dict(state)

    def dumps(self, path: str | Path) -> None:
        """Each stream under ``path/stream_<k>`` (:meth:`NStepReplayBuffer.dumps`) and the
        layout in ``path/streams.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for k, stream in enumerate(self.streams):
            stream.dumps(path / _STREAM_DIR.format(k))
        with open(path / _LAYOUT_FILE, "w") as file:
            json.dump(self._layout(), file)

    def loads(self, path: str | Path) -> None:
        """Restores a :meth:`dumps` of the same layout; unknown files are refused."""
        path = Path(path)
        layout_file = path / _LAYOUT_FILE
        if not layout_file.is_file():
            raise ValueError(f"replay buffer folder {path} holds one stream (a run with "
                             f"collector.workers=1); this run has {len(self.streams)}")
        with open(layout_file) as file:
            self._check_layout(json.load(file), str(path))
        allowed = re.compile(r"(manifest\.json|streams\.json|stream_\d+)")
        unknown = [p.name for p in path.iterdir() if not allowed.fullmatch(p.name)]
        if unknown:
            raise UnsafeBufferError(f"replay buffer folder {path} holds files a cp3er "
                                    f"buffer does not write ({', '.join(sorted(unknown))})")
        for k, stream in enumerate(self.streams):
            stream.loads(path / _STREAM_DIR.format(k))

    def _check_layout(self, saved: dict[str, int] | None, where: str) -> None:
        if saved != self._layout():
            raise ValueError(f"replay buffer {where} was written with {saved}, this buffer "
                             f"has {self._layout()} (collector.workers and replay.capacity "
                             "must match the run's)")

    def dump_nbytes(self) -> int:
        """Bytes :meth:`dumps` writes (about)."""
        return sum(s.dump_nbytes() for s in self.streams)

    def dump_largest(self) -> int:
        """Bytes of the largest file :meth:`dumps` writes."""
        return max(s.dump_largest() for s in self.streams)
