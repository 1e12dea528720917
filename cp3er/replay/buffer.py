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

from pathlib import Path

import torch
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer, RoundRobinWriter

from cp3er.choices import SAMPLER_MODES, STORAGE_DEVICES, STORAGES
from cp3er.replay.dump import BufferCheckpoint
from cp3er.replay.rows import RowWriter
from cp3er.replay.sampler import make_sampler
from cp3er.replay.transitions import TransitionReader

__all__ = ["STORAGES", "STORAGE_DEVICES", "NStepReplayBuffer"]


class NStepReplayBuffer(RowWriter, TransitionReader, BufferCheckpoint):
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
        self._keep_filled_rows(backing)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.episode_ends = torch.zeros(0, dtype=torch.bool)  # of the last batch written
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
