"""Frame-efficient n-step replay for pixel and state observations (DrQ-v2 style).

DrQ-v2 (Yarats et al., 2021, arXiv 2107.09645) stores every frame once and rebuilds
frame stacks and n-step returns when sampling; CP3ER (arXiv 2410.00051) keeps that
pipeline and changes only which transitions are drawn (prioritized proximal
experience, :class:`~cp3er.replay.sampler.ProximalSampler`).

Layout. One storage row per environment step holds the NEWEST frame of the step's
observation (``3x84x84`` uint8 for pixels, the whole vector for states), the action,
the reward, the ``terminated``/``truncated`` flags of the step, an episode id and the
step in the episode. An episode that ends gets one extra row holding its final
next-observation frame (``final=True``, never a transition start), so next
observations are rebuilt from the following rows. Rows go through a TorchRL
:class:`~torchrl.data.RoundRobinWriter` into a
:class:`~torchrl.data.LazyTensorStorage` (RAM, or GPU memory with
``storage_device="cuda"``) or :class:`~torchrl.data.LazyMemmapStorage` (disk): ~21.2 KB
a pixel transition instead of 63.5 KB for stored 9-channel stacks.

Storage device (``replay.device``). With the storage on a GPU the rows are copied there
when written, and sampling runs there: the validity of the drawn slots, the frame-stack
gathers and the n-step sums (float64) are device tensors, and the batch is born on the
device. Only the random draw of the slots stays on the CPU, from the buffer's (CPU)
generator, whose state TorchRL checkpoints: the drawn slots (``batch_size`` integers) are
copied to the device, so a GPU storage samples exactly the slots a CPU storage samples
for the same seed. What reads back to the host: per sampled batch, one count per rejection
round of the sampler (how many drawn slots were valid); per write, the newest slot; and
:meth:`~NStepReplayBuffer.gather` of given slots checks them (two reads).

What TorchRL does not cover, and is written here: ``CatFrames``'s replay-buffer
stacking is slow (pytorch/rl#2406; docs/performance.md), ``MultiStepTransform`` computes n-step
targets at write time and cannot see episode ends written later, and TorchRL's
samplers cannot skip rows that are not valid transition starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer, RoundRobinWriter

from cp3er.replay.sampler import SAMPLER_MODES, _storage_column, make_sampler

__all__ = ["STORAGES", "STORAGE_DEVICES", "NStepReplayBuffer", "UnsafeBufferError",
           "make_replay_buffer"]

#: ``replay.storage``: RAM (``LazyTensorStorage``) or disk (``LazyMemmapStorage``).
STORAGES = ("memory", "memmap")
#: ``replay.device``: where the storage lives (``memmap`` is CPU-only: TorchRL's
#: ``LazyMemmapStorage`` refuses other devices).
STORAGE_DEVICES = ("cpu", "cuda")
_COUNTERS_FILE = "nstep_buffer.json"
_PREFETCH_FILE = "prefetch.pkl"
# Every file dumps() writes (relative paths; storage columns are <key>.memmap). Nothing
# else is loaded from a checkpoint folder: TorchRL would unpickle prefetch.pkl, torch.load
# transform.t, and tensordict unpickle other.pickle / non-tensor leaves.
_DUMP_FILES = ("manifest.json", _COUNTERS_FILE, "buffer_metadata.json", "writer/metadata.json",
               "sampler/proximal_sampler.pt", "storage/meta.json",
               "storage/storage_metadata.json", "rng_state/meta.json",
               "rng_state/rng_state.memmap")  # rng_state/: with a sampling generator
_TENSORDICT_TYPE = str(TensorDict)


class UnsafeBufferError(ValueError):
    """A buffer folder holding files that loading could execute (pickles)."""


@dataclass
class _Segments:
    """Per-step episode bookkeeping of one collector batch (``[T]`` each)."""

    terminated: torch.Tensor
    truncated: torch.Tensor
    done: torch.Tensor  # terminated or truncated: the episode ends after this step
    episode: torch.Tensor  # episode id
    step: torch.Tensor  # step in the episode
    traj: torch.Tensor | None  # the collector's trajectory ids, where given


class NStepReplayBuffer:
    """Replay buffer storing each frame once; stacks and n-step targets built at sampling.

    Feed it the batches of a single-environment TorchRL collector (batch ``[T]``; keys
    ``obs_key``, ``action``, ``("next", obs_key)``, ``("next", "reward")``,
    ``("next", "terminated")``, ``("next", "truncated")``, optionally
    ``("next", "done")`` and ``("collector", "traj_ids")``). Stacked pixel
    observations are assumed to be channel stacks built by ``CatFrames(dim=-3)``
    (oldest..newest), whose reset fills the stack with copies of the first frame;
    episodes must be written from their first step.

    A sample of ``B`` transitions is a TensorDict of batch ``[B]`` with ``obs_key``
    (the rebuilt stack; ``uint8 [B, 9, 84, 84]`` or ``[B, D]``), ``action``,
    ``("next", obs_key)`` (the stack ``n'`` steps later), ``("next", "reward")``
    (``sum_{k<n'} gamma^k r_{t+k}``, ``[B, 1]``), ``("next", "discount")``
    (``gamma^n' * (1 - terminated)``, ``[B, 1]``: the bootstrap multiplier the critic
    applies directly), ``("next", "terminated")``, ``("next", "n_steps")`` (``n'``),
    ``index`` (storage slot) and ``age`` (rows written since, 1 = newest).

    ``n' = min(n, steps to the episode's end, steps written so far)``: a time-limit
    truncation bootstraps from the final observation, a termination cuts the return.
    Head-of-buffer rule: a transition of the episode still being collected uses the
    steps already written after it, bootstrapping from the newest written frame (its
    target is re-derived, longer, once more steps arrive); the newest row has no next
    frame yet and is not sampled.

    Never sampled: empty slots, final-frame rows, rows whose next frame is not
    written yet, and rows whose frame stack reaches rows the ring has overwritten
    (the oldest ``frame_stack - 1`` retained rows of a partially overwritten episode).
    The n-step window only looks forward from a retained row, so it never reaches
    overwritten rows.

    Stacks are clamped at the episode's first frame (what ``CatFrames`` does at reset).
    Ages count storage rows, final-frame rows included (one extra row an episode).

    Args:
        capacity: storage rows (transitions plus one final-frame row per episode).

    Keyword Args:
        obs_key: ``"pixels"`` (channel-stacked uint8 frames) or a state key such as
            ``"observation"``.
        frame_stack: frames per stacked observation (1 for states).
        n_step: the ``n`` of the n-step return.
        gamma: discount factor.
        batch_size: default batch size of :meth:`sample`.
        sampler: ``"proximal"`` (PPE, paper weights), ``"reference"`` (the reference
            code's inverted episode weighting) or ``"uniform"``.
        alpha: PPE sharpness.
        transitions_per_episode: the episode length the ``"reference"`` sampler assumes.
        storage: ``"memory"`` (RAM) or ``"memmap"`` (disk, under ``scratch_dir``).
        scratch_dir: directory of the memmap storage (a temporary one when ``None``).
        storage_device: where the ``"memory"`` storage lives, and where sampling runs
            (``"cpu"`` or a CUDA device; ``"memmap"`` is CPU-only).
        device: where sampled batches are sent (``None``: ``storage_device``, where they
            are built).
        generator: optional CPU ``torch.Generator`` for sampling (the global CPU RNG
            otherwise), also with a CUDA storage.
    """

    def __init__(
        self,
        capacity: int,
        *,
        obs_key: str = "pixels",
        frame_stack: int = 3,
        n_step: int = 3,
        gamma: float = 0.99,
        batch_size: int = 256,
        sampler: str = "proximal",
        alpha: float = 2.0,
        transitions_per_episode: int = 1000,
        storage: str = "memory",
        scratch_dir: str | Path | None = None,
        storage_device: str | torch.device = "cpu",
        device: str | torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if sampler not in SAMPLER_MODES:
            raise ValueError(f"sampler must be one of {SAMPLER_MODES}, got {sampler!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        storage_device = torch.device(storage_device)
        if storage_device.type not in STORAGE_DEVICES:
            raise ValueError(f"storage_device must be one of {STORAGE_DEVICES} (a CUDA device "
                             f"may carry an index), got {str(storage_device)!r}")
        if storage == "memmap" and storage_device.type != "cpu":
            raise ValueError(f"storage='memmap' lives on the CPU: storage_device must be "
                             f"'cpu', got {str(storage_device)!r} (use storage='memory')")
        if storage_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"storage_device={str(storage_device)!r}: no CUDA device is "
                             "available on this machine (use 'cpu')")
        if frame_stack < 1 or n_step < 1:
            raise ValueError(f"frame_stack and n_step must be >= 1, got {frame_stack}, {n_step}")
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.capacity = int(capacity)
        self.obs_key = obs_key
        self.frame_stack = int(frame_stack)
        self.n_step = int(n_step)
        self.gamma = float(gamma)
        self.batch_size = int(batch_size)
        self.storage_device = storage_device
        self.device = storage_device if device is None else torch.device(device)
        self.sampler = make_sampler(
            sampler,
            alpha=alpha,
            transitions_per_episode=transitions_per_episode,
            episode_key="episode",
            valid_fn=self._valid_drawn,
        )
        if storage == "memory":
            backing = LazyTensorStorage(self.capacity, device=storage_device)
        else:
            backing = LazyMemmapStorage(self.capacity, scratch_dir=scratch_dir, device="cpu")
        self._rb = ReplayBuffer(
            storage=backing,
            sampler=self.sampler,
            writer=RoundRobinWriter(),
            batch_size=self.batch_size,
            generator=generator,
        )
        # A checkpoint holds the filled rows only (its size grows with the data, not the
        # capacity): TorchRL's storage-checkpointer hooks cut the storage to its length
        # on dumps and copy the saved rows back into the allocated storage on loads.
        # (Registered after ReplayBuffer(), which installs the storage's checkpointer.)
        backing.register_save_hook(_filled_rows(backing))
        backing.register_load_hook(_into_storage(backing))
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._written = 0  # absolute rows written (position of the next row)
        self._head_slot = -1  # storage slot of the newest row
        self._last_episode = -1  # id of the most recently started episode
        self._pending: dict[str, int] | None = None  # the episode still being collected

    # ------------------------------------------------------------------- properties
    @property
    def storage(self) -> LazyTensorStorage:
        """The TorchRL storage (one row per frame)."""
        return self._rb.storage

    @property
    def write_count(self) -> int:
        """Rows written since creation (transitions plus final-frame rows)."""
        return self._written

    @property
    def pending_traj(self) -> int | None:
        """The collector trajectory id of the episode still being collected (``None``
        when the last write ended an episode, or nothing was written; -1 when written
        without trajectory ids): the next batch continues it if it starts with that id."""
        return None if self._pending is None else self._pending["traj"]

    def sampling_mass(self) -> float:
        """The summed sampling weight of the stored rows (see
        :meth:`~cp3er.replay.sampler.RingSampler.total_weight`)."""
        return self.sampler.total_weight(self._rb.storage)

    def __len__(self) -> int:
        """Rows stored (transitions plus one final-frame row per finished episode)."""
        return len(self._rb)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self.capacity}, obs_key={self.obs_key!r}, "
            f"frame_stack={self.frame_stack}, n_step={self.n_step}, gamma={self.gamma}, "
            f"sampler={self.sampler!r}, rows={len(self)})"
        )

    # ------------------------------------------------------------------------ write
    def _newest_frame(self, obs: torch.Tensor) -> torch.Tensor:
        """The newest frame of stacked observations ``[..., F*C, H, W]`` or ``[..., F*D]``."""
        if self.frame_stack == 1:
            return obs
        dim = -3 if obs.ndim >= 4 else -1
        size = obs.shape[dim]
        if size % self.frame_stack:
            raise ValueError(
                f"{self.obs_key!r} has {size} entries along the stack dim {dim}, "
                f"not a multiple of frame_stack={self.frame_stack}"
            )
        per_frame = size // self.frame_stack
        return obs.narrow(dim, size - per_frame, per_frame)

    def extend(self, batch: TensorDictBase) -> torch.Tensor:
        """Writes a collector batch (shape ``[T]`` or ``[1, T]``); returns the written slots
        (on the storage device).

        Two jobs, on the CPU: :meth:`_segment` finds the episodes in the batch (continuing
        the one left pending by the previous batch), :meth:`_rows` lays them out as storage
        rows (one a step, plus a final-frame row after each episode end); the rows are then
        copied to the storage device in one transfer.
        """
        if batch.batch_dims == 2 and batch.shape[0] == 1:
            batch = batch[0]
        if batch.batch_dims != 1:
            raise ValueError(
                "NStepReplayBuffer takes the [T] batches of a single-environment collector "
                f"(episodes must be contiguous in the ring); got batch shape {batch.shape}"
            )
        if batch.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long)
        batch = batch.to("cpu")
        segments = self._segment(batch)
        rows = self._rows(batch, segments)
        self._last_episode = int(segments.episode[-1])
        if segments.done[-1]:
            self._pending = None
        else:
            traj = segments.traj
            self._pending = {"traj": int(traj[-1]) if traj is not None else -1,
                             "next_step": int(segments.step[-1]) + 1}
        n_rows = rows.shape[0]
        self._written += n_rows
        if n_rows > self.capacity:  # only the newest `capacity` rows survive anyway
            rows = rows[n_rows - self.capacity :]
        index = self._rb.extend(rows.to(self.storage_device))
        self._head_slot = int(index[-1])
        return index

    def _segment(self, batch: TensorDictBase) -> _Segments:
        """The episodes of a ``[T]`` batch: per-step end flags, episode ids and steps.

        An episode starts after a done, at a traj-id change, or at the batch's first step
        when it does not continue the episode left pending by the previous batch.
        """
        steps = batch.shape[0]
        terminated = batch.get(("next", "terminated")).reshape(steps).bool()
        truncated = batch.get(("next", "truncated"), None)
        done = batch.get(("next", "done"), None)
        done = terminated.clone() if done is None else done.reshape(steps).bool() | terminated
        if truncated is None:
            truncated = done & ~terminated
        else:
            truncated = truncated.reshape(steps).bool()
            done = done | truncated
        traj = batch.get(("collector", "traj_ids"), None)
        traj = None if traj is None else traj.reshape(steps).long()

        start = torch.zeros(steps, dtype=torch.bool)
        start[1:] = done[:-1]
        if traj is not None:
            start[1:] |= traj[1:] != traj[:-1]
        pending = self._pending
        continues = pending is not None and (traj is None or int(traj[0]) == pending["traj"])
        start[0] = not continues
        segment = torch.cumsum(start.long(), 0)
        arange = torch.arange(steps)
        first_row = torch.cummax(torch.where(start, arange, torch.zeros_like(arange)), 0).values
        step = arange - first_row
        if continues:
            step = torch.where(segment == 0, step + pending["next_step"], step)
        return _Segments(terminated, truncated, done, self._last_episode + segment, step, traj)

    def _rows(self, batch: TensorDictBase, seg: _Segments) -> TensorDict:
        """The storage rows of a segmented batch: each step's row, plus a final-frame row
        (the episode's last next-observation frame) after each episode end."""
        steps, done = batch.shape[0], seg.done
        before = torch.cumsum(done.long(), 0) - done.long()
        row_of_step = torch.arange(steps) + before
        final_rows = row_of_step[done] + 1
        n_rows = steps + int(done.sum())
        frame = self._newest_frame(batch.get(self.obs_key))
        final_frame = self._newest_frame(batch.get(("next", self.obs_key))[done])
        action = batch.get("action")
        reward = batch.get(("next", "reward")).reshape(steps, 1).to(torch.float32)

        rows = TensorDict(
            {
                "frame": frame.new_zeros((n_rows, *frame.shape[1:])),
                "action": action.new_zeros((n_rows, *action.shape[1:])),
                "reward": torch.zeros(n_rows, 1),
                "terminated": torch.zeros(n_rows, 1, dtype=torch.bool),
                "truncated": torch.zeros(n_rows, 1, dtype=torch.bool),
                "final": torch.zeros(n_rows, dtype=torch.bool),
                "episode": torch.zeros(n_rows, dtype=torch.long),
                "step": torch.zeros(n_rows, dtype=torch.int32),
            },
            batch_size=[n_rows],
        )
        rows["frame"][row_of_step] = frame
        rows["frame"][final_rows] = final_frame
        rows["action"][row_of_step] = action
        rows["reward"][row_of_step] = reward
        rows["terminated"][row_of_step] = seg.terminated.unsqueeze(-1)
        rows["truncated"][row_of_step] = seg.truncated.unsqueeze(-1)
        rows["final"][final_rows] = True
        rows["episode"][row_of_step] = seg.episode
        rows["episode"][final_rows] = seg.episode[done]
        rows["step"][row_of_step] = seg.step.to(torch.int32)
        rows["step"][final_rows] = (seg.step[done] + 1).to(torch.int32)
        return rows

    # ------------------------------------------------------------------------- read
    def _columns(self) -> dict[str, torch.Tensor]:
        storage = self._rb.storage
        if len(storage) == 0:
            raise RuntimeError("The replay buffer is empty.")
        return {
            key: _storage_column(storage, key)
            for key in ("frame", "action", "reward", "terminated", "final", "episode", "step")
        }

    def _locate(
        self, index: torch.Tensor, cols: dict[str, torch.Tensor], *, check: bool = True
    ) -> dict[str, torch.Tensor]:
        """Absolute position, n-step length, episode start and validity of slots (moved to
        the storage device); ``check``: refuse slots outside the storage (a host read)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.storage_device).reshape(-1)
        cap, written = self.capacity, self._written
        if check and bool(((index < 0) | (index >= cap)).any()):
            raise IndexError(f"storage slots must lie in [0, {cap})")
        stored = len(self._rb.storage)
        age = (self._head_slot - index) % cap + 1
        pos = written - age
        episode = _take(cols["episode"], index)
        ahead = torch.arange(1, self.n_step + 1, device=index.device)
        same = (pos[:, None] + ahead < written) & (
            _take(cols["episode"], (index[:, None] + ahead) % cap) == episode[:, None]
        )
        n_steps = same.long().cumprod(1).sum(1)
        start = pos - _take(cols["step"], index).long()
        first_needed = torch.maximum(pos - (self.frame_stack - 1), start)
        valid = (
            (age <= stored)
            & ~_take(cols["final"], index)
            & (n_steps >= 1)
            & (first_needed >= written - stored)
        )
        return {
            "index": index,
            "age": age,
            "pos": pos,
            "n_steps": n_steps,
            "start": start,
            "valid": valid,
        }

    def valid_mask(self, index: torch.Tensor) -> torch.Tensor:
        """Whether each storage slot in ``index`` is a valid transition start."""
        return self._locate(index, self._columns())["valid"]

    def _valid_drawn(self, index: torch.Tensor) -> torch.Tensor:
        """:meth:`valid_mask` of slots the sampler drew (inside the storage by
        construction: not checked, no host read)."""
        return self._locate(index, self._columns(), check=False)["valid"]

    def gather(self, index: torch.Tensor) -> TensorDict:
        """The transitions starting at storage slots ``index`` (all must be valid; any
        device: they are moved to the storage's)."""
        cols = self._columns()
        loc = self._locate(index, cols)
        if not bool(loc["valid"].all()):
            raise ValueError(f"invalid transition starts: {loc['index'][~loc['valid']].tolist()}")
        return self._transitions(loc, cols)

    def _transitions(self, loc: dict[str, torch.Tensor], cols: dict[str, torch.Tensor]
                     ) -> TensorDict:
        """The batch of the located (valid) slots: frame stacks, action, n-step return."""
        index, pos, n_steps, start = loc["index"], loc["pos"], loc["n_steps"], loc["start"]
        size, cap, stack = index.numel(), self.capacity, self.frame_stack
        device = index.device

        # Frame stacks of obs_t and obs_{t+n'}, oldest..newest, clamped at the episode start.
        offsets = torch.arange(-(stack - 1), 1, device=device)
        rows = torch.cat([pos[:, None] + offsets, (pos + n_steps)[:, None] + offsets], 1)
        rows = torch.maximum(rows, start[:, None])
        slots = (self._head_slot - (self._written - 1 - rows)) % cap
        frame_shape = cols["frame"].shape[1:]
        stacked = (size, stack * frame_shape[0], *frame_shape[1:])  # channels/features stacked
        obs = _take(cols["frame"], slots[:, :stack]).reshape(stacked)
        next_obs = _take(cols["frame"], slots[:, stack:]).reshape(stacked)

        # n-step return over the n' rows of the window.
        ahead = torch.arange(self.n_step, device=device)
        window = (index[:, None] + ahead) % cap
        rewards = _take(cols["reward"], window).reshape(size, self.n_step)
        powers = self.gamma ** ahead.to(torch.float64)
        mask = ahead[None, :] < n_steps[:, None]
        # where, not a product with the mask: rows past the head may be unwritten storage
        # (uninitialised memory, possibly NaN/inf bit patterns) and NaN * 0 is NaN.
        discounted = torch.where(mask, rewards.double() * powers, 0.0)
        reward = discounted.sum(1, keepdim=True).float()
        terminated = _take(cols["terminated"], (index + n_steps - 1) % cap).reshape(size, 1)
        discount = (self.gamma ** n_steps.double()).unsqueeze(1) * (~terminated).double()

        out = TensorDict(
            {
                self.obs_key: obs,
                "action": _take(cols["action"], index),
                "next": {
                    self.obs_key: next_obs,
                    "reward": reward,
                    "discount": discount.float(),
                    "terminated": terminated,
                    "n_steps": n_steps.unsqueeze(1),
                },
                "index": index,
                "age": loc["age"],
            },
            batch_size=[size],
        )
        return out if self.device == self.storage_device else out.to(self.device)

    def sample(self, batch_size: int | None = None) -> TensorDict:
        """Draws a batch with the configured sampler (see the class docstring for keys)."""
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        index, _ = self.sampler.sample(self._rb.storage, batch_size)
        # the sampler returns only slots valid_mask accepted: no second check (host reads)
        cols = self._columns()
        return self._transitions(self._locate(index, cols, check=False), cols)

    # ------------------------------------------------------------------ checkpoints
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
        """Restores a :meth:`state_dict` (saved from a storage on any device); sampling then
        continues exactly."""
        self._load_counters(state_dict["counters"])
        storage = self._rb.storage
        rb_state = state_dict["rb"]
        saved = rb_state["_storage"]["_storage"]
        if saved:
            # The saved rows on this storage's device (tensordict refuses to load another
            # device's), into a storage allocated first: under scratch_dir for a memmap
            # storage (loading into an uninitialised LazyMemmapStorage would memmap into a
            # fresh temporary directory), on storage_device for a memory one.
            rows = TensorDict().load_state_dict(saved, strict=False).to(self.storage_device)
            if not storage.initialized:
                storage._init(rows[0])
            rb_state = {**rb_state, "_storage": {**rb_state["_storage"],
                                                 "_storage": rows.state_dict()}}
        self._rb.load_state_dict(rb_state)

    def dumps(self, path: str | Path) -> None:
        """Checkpoints the whole buffer under directory ``path`` (storage as memmaps).

        Uses TorchRL's ``ReplayBuffer.dumps`` (storage, sampler, writer, RNG); with a
        memmap storage whose ``scratch_dir`` is ``path/storage`` the copy is skipped. A
        GPU storage is copied to the files (tensordict memmaps on the CPU): the folder
        is the same whatever the storage device, and :meth:`loads` puts it on this
        buffer's.
        Writes no pickle: TorchRL 0.14 always pickles its prefetch queue to
        ``prefetch.pkl`` (and unpickles it on load when present); this buffer never
        prefetches, so the file, an empty queue, is removed.
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
        """Bytes :meth:`dumps` writes (its memmaps of the filled rows; the metadata files
        are small)."""
        return sum(self._tensor_nbytes()) + (1 << 20)

    def dump_largest(self) -> int:
        """Bytes of the largest file :meth:`dumps` writes."""
        return max(self._tensor_nbytes())

    def loads(self, path: str | Path) -> None:
        """Restores a buffer written by :meth:`dumps`; sampling then continues exactly.

        A folder holding any file :meth:`dumps` does not write (a pickle such as TorchRL's
        ``prefetch.pkl``, a ``transform.t``) is refused: TorchRL and tensordict unpickle
        such files. Metadata naming a tensorclass (tensordict imports
        the module it names) is refused too.
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
            # allocate the full capacity (under scratch_dir for a memmap storage, on
            # storage_device for a memory one) from the saved rows' layout; the load hook
            # then copies the rows into it
            storage._init(TensorDict.load_memmap(path / "storage")[0])
        self._rb.loads(path)

    def cut_episode(self) -> None:
        """Ends the episode still being collected without a done (a resumed run starts
        its collector on a fresh reset): the next write starts a new episode whatever
        its traj ids. The cut episode then reads like an abandoned one: its n-step
        windows stop at its last written row (bootstrapping, as for a truncation) and
        that last row, whose next frame was never written, is never sampled."""
        self._pending = None

    def empty(self) -> None:
        """Drops all data and counters."""
        self._rb.empty()
        self._reset_counters()


def _filled_rows(storage: LazyTensorStorage):
    """TorchRL storage save hook: the storage's filled rows (all of them once it wrapped)."""
    def hook(data: TensorDictBase, path: Path) -> TensorDictBase:
        return data[: len(storage)]
    return hook


def _into_storage(storage: LazyTensorStorage):
    """TorchRL storage load hook: the saved (filled) rows copied into the storage's first
    rows, allocated by :meth:`NStepReplayBuffer.loads`; returns the storage's own tensors,
    which TorchRL then copies onto themselves (a no-op)."""
    def hook(saved: TensorDictBase, out: TensorDictBase) -> TensorDictBase:
        rows = saved.shape[0]
        if rows > out.shape[0]:
            raise ValueError(f"the saved storage has {rows} rows, more than this buffer's "
                             f"capacity {out.shape[0]}")
        out[:rows].update_(saved)
        return out
    return hook


def _check_dump_files(path: Path) -> None:
    """Raise ``ValueError`` naming any file of a buffer folder :meth:`~NStepReplayBuffer.dumps`
    does not write, or storage metadata that would make tensordict import a module."""
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


def _take(column: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``column[index]`` along dim 0 via ``index_select`` (several times faster than
    advanced indexing for large rows: docs/performance.md, "Measurements behind code
    choices")."""
    out = column.index_select(0, index.reshape(-1))
    return out.reshape(*index.shape, *column.shape[1:])


def make_replay_buffer(capacity: int, *, streams: int = 1, **kwargs: Any):
    """The CP3ER/DrQ-v2 replay buffer; keyword arguments as :class:`NStepReplayBuffer`.
    ``streams > 1``: a :class:`~cp3er.replay.streams.StreamedReplayBuffer`, one ring per
    collector worker.

    Examples:
        >>> rb = make_replay_buffer(100_000, obs_key="pixels", frame_stack=3, n_step=3)
        >>> # for batch in collector: rb.extend(batch); batch = rb.sample()
    """
    if streams == 1:
        return NStepReplayBuffer(capacity, **kwargs)
    from cp3er.replay.streams import StreamedReplayBuffer  # imports this module

    return StreamedReplayBuffer(capacity, streams, **kwargs)
