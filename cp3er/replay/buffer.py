"""Frame-efficient n-step replay for pixel and state observations (DrQ-v2 style).

DrQ-v2 (Yarats et al. 2021, arXiv 2107.09645) stores every frame once and rebuilds frame
stacks and n-step returns when sampling; CP3ER changes only which rows are drawn (PPE).
Written here because TorchRL's ``CatFrames`` stacking is slow (pytorch/rl#2406),
``MultiStepTransform`` cannot see episode ends written later, and its samplers cannot skip
invalid transition starts. Row layout, sampling rules and devices: docs/implementation.md,
"The replay buffer".
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

    Takes a single-env collector's ``[T]`` batches (``obs_key``, ``action`` and under
    ``"next"`` ``obs_key``, ``reward``, ``terminated``, ``truncated``, optionally ``done``;
    optionally ``("collector", "traj_ids")``); pixel stacks are ``CatFrames(dim=-3)``, oldest
    first.
    A sample ``[B]`` holds ``obs_key``, ``action``, ``("next", obs_key)`` (``n'`` steps later),
    ``("next", "reward")`` (``sum_{k<n'} gamma^k r_{t+k}``), ``("next", "discount")``
    (``gamma^n' (1 - terminated)``, the critic's bootstrap multiplier), ``("next",
    "terminated")``, ``("next", "n_steps")``, ``index`` (slot) and ``age`` (1 = newest), with
    ``n' = min(n, steps to the episode's end, steps written so far)`` (a truncation
    bootstraps, a termination cuts the return; docs/implementation.md, "n-step at the head of
    the buffer").

    Args:
        capacity: storage rows (transitions plus one final-frame row per episode).
        obs_key: ``"pixels"`` (channel-stacked uint8 frames) or a state key.
        frame_stack: frames per stacked observation (1 for states).
        n_step, gamma: the n-step return.
        batch_size: default batch size of :meth:`sample`.
        sampler: ``"proximal"`` (PPE), ``"reference"`` or ``"uniform"``.
        alpha: PPE sharpness.
        transitions_per_episode: the episode length the ``"reference"`` sampler assumes.
        storage: ``"memory"`` or ``"memmap"`` (disk, under ``scratch_dir``; a temporary
            folder when ``None``).
        storage_device: where a ``"memory"`` storage lives and sampling runs.
        device: where sampled batches are sent (default ``storage_device``).
        generator: optional CPU ``torch.Generator`` for sampling, also with a CUDA storage.
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
        """Trajectory id of the episode still being collected (``None``: none; -1: written
        without ids); a batch starting with it continues the episode."""
        return None if self._pending is None else self._pending["traj"]

    def sampling_mass(self) -> float:
        """:meth:`~cp3er.replay.sampler.RingSampler.total_weight` of the storage."""
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
        """Ends the episode in progress without a done (a resume starts on a fresh reset):
        read like a truncation (docs/checkpoints.md, "Resume")."""
        self._pending = None

    def empty(self) -> None:
        """Drops all data and counters."""
        self._rb.empty()
        self._reset_counters()
