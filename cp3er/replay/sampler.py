"""TorchRL :class:`Sampler` s of a ring-written storage that draw rows by age, one law per
``replay.sampler`` mode.

- ``proximal``: prioritized proximal experience (PPE; Li et al., "Generalizing Consistency
  Policy to Visual RL with Prioritized Proximal Experience Regularization", NeurIPS 2024,
  arXiv 2410.00051). A row of age ``dt >= 1`` (rows written since) in a buffer of capacity
  ``T`` gets ``beta(dt) = 1 / (1 + exp(2 alpha - 2 alpha T / dt)) = sigmoid(2 alpha (T/dt - 1))``.
- ``reference``: the reference code's episode weighting, which inverts the paper.
- ``uniform``: every row alike.

Ages are drawn on the CPU and copied to the storage's device (docs/implementation.md,
"The replay buffer").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrl.data.replay_buffers.samplers import Sampler
from torchrl.data.replay_buffers.storages import Storage, TensorStorage

from cp3er.choices import SAMPLER_MODES

__all__ = [
    "SAMPLER_MODES",
    "AgeWeighting",
    "ProximalAges",
    "ProximalSampler",
    "ReferenceEpisodeAges",
    "RingPosition",
    "RingSampler",
    "UniformAges",
    "make_sampler",
    "proximal_weight",
    "storage_column",
]


_STATE_FILE = "proximal_sampler.pt"


def proximal_weight(age: torch.Tensor, capacity: int, alpha: float = 2.0) -> torch.Tensor:
    """PPE weight ``sigmoid(2 alpha (T / dt - 1))`` (float64, shaped like ``age``) of rows of
    age ``dt >= 1`` in a buffer of capacity ``T``; ``alpha`` 2.0 in the paper."""
    dt = age.to(torch.float64)
    return torch.sigmoid(2.0 * alpha * (capacity / dt - 1.0))


@dataclass(frozen=True)
class RingPosition:
    """Where a round-robin writer stands: ``written`` rows so far, the newest in slot
    ``newest``, ``stored`` of ``capacity`` slots filled. Row ages are ``1..stored``."""

    written: int
    newest: int
    stored: int
    capacity: int

    def slots(self, ages: torch.Tensor) -> torch.Tensor:
        """The storage slots of rows of the given ages (1 = newest)."""
        return (self.newest - ages + 1) % self.capacity


class AgeWeighting:
    """A sampling law over the ages ``1..stored`` of a ring's rows: :meth:`weights`
    (unnormalised), optionally a faster exact :meth:`draw`."""

    mode: str = ""

    def observe(self, storage: Storage, ring: RingPosition) -> None:
        """Reads the rows written since the last draw (the reference mode's episode scan)."""

    def weights(self, ages: torch.Tensor, ring: RingPosition) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, count: int, ring: RingPosition, gen: torch.Generator | None,
             ) -> torch.Tensor:
        """``count`` i.i.d. ages in ``1..ring.stored`` (inverse CDF, ``O(stored)``)."""
        ages = torch.arange(1, ring.stored + 1, dtype=torch.long)
        return ages[_inverse_cdf(torch.cumsum(self.weights(ages, ring), 0), count, gen)]

    def total(self, ring: RingPosition) -> float:
        """The summed weight of the ``ring.stored`` rows (default: ``O(stored)``)."""
        ages = torch.arange(1, ring.stored + 1, dtype=torch.long)
        return float(self.weights(ages, ring).sum())

    def hyper_parameters(self) -> dict[str, Any]:
        """The law's settings, saved with the state and compared on load."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved."""


class UniformAges(AgeWeighting):
    """Every stored row equally likely."""

    mode = "uniform"

    def weights(self, ages: torch.Tensor, ring: RingPosition) -> torch.Tensor:
        return torch.ones(ages.shape, dtype=torch.float64)

    def draw(self, count: int, ring: RingPosition, gen: torch.Generator | None,
             ) -> torch.Tensor:
        return torch.randint(1, ring.stored + 1, (count,), generator=gen)

    def total(self, ring: RingPosition) -> float:
        return float(ring.stored)


class ProximalAges(AgeWeighting):
    """The paper's PPE law on each row's exact age.

    The ``n`` stored ages are ``1..n``, so ``C[d-1] = sum_{k<=d} beta(k)`` is built once per
    capacity and ``age = searchsorted(C[:n], u) + 1``, ``u ~ U(0, C[n-1])``: exact,
    ``O(B log T)``.
    """

    mode = "proximal"

    def __init__(self, alpha: float = 2.0) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self._cdf: torch.Tensor | None = None
        self._cdf_capacity = -1

    def weights(self, ages: torch.Tensor, ring: RingPosition) -> torch.Tensor:
        return proximal_weight(ages, ring.capacity, self.alpha)

    def _table(self, capacity: int) -> torch.Tensor:
        if self._cdf is None or self._cdf_capacity != capacity:
            ages = torch.arange(1, capacity + 1, dtype=torch.float64)
            self._cdf = torch.cumsum(proximal_weight(ages, capacity, self.alpha), 0)
            self._cdf_capacity = capacity
        return self._cdf

    def draw(self, count: int, ring: RingPosition, gen: torch.Generator | None,
             ) -> torch.Tensor:
        return _inverse_cdf(self._table(ring.capacity)[:ring.stored], count, gen) + 1

    def total(self, ring: RingPosition) -> float:
        return float(self._table(ring.capacity)[ring.stored - 1]) if ring.stored else 0.0

    def hyper_parameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


class ReferenceEpisodeAges(AgeWeighting):
    """The reference code's inverted weighting: episode rank from the OLDEST, ``dt = rank *
    transitions_per_episode + 1`` (its ``_sample_weights``), so older episodes weigh more.

    Needs an episode id per row under ``episode_key``, episodes contiguous in write order.
    Equivalences with the reference's episode draw and sharding: docs/implementation.md,
    "The replay buffer".
    """

    mode = "reference"

    def __init__(self, alpha: float = 2.0, transitions_per_episode: int = 1000,
                 episode_key: str = "episode") -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if transitions_per_episode < 1:
            raise ValueError(f"transitions_per_episode must be >= 1, got {transitions_per_episode}")
        self.alpha = float(alpha)
        self.transitions_per_episode = int(transitions_per_episode)
        self.episode_key = episode_key
        self.empty()

    def empty(self) -> None:
        self._ep_ids = torch.zeros(0, dtype=torch.long)  # episodes in write order
        self._ep_starts = torch.zeros(0, dtype=torch.long)  # their absolute first rows
        self._scanned = 0  # rows scanned so far

    def observe(self, storage: Storage, ring: RingPosition) -> None:
        """Appends episodes started since the last scan; drops fully overwritten ones."""
        oldest = ring.written - ring.stored
        first = max(self._scanned, oldest)
        if first < ring.written:
            pos = torch.arange(first, ring.written, dtype=torch.long)
            column = storage_column(storage, self.episode_key)
            # the episode table stays on the CPU: the new rows' ids are read back
            ids = column[ring.slots(ring.written - pos).to(column.device)].reshape(-1).long().cpu()
            prev = self._ep_ids[-1:] if self._ep_ids.numel() else ids[:1] - 1
            new = ids != torch.cat([prev, ids[:-1]])
            self._ep_ids = torch.cat([self._ep_ids, ids[new]])
            self._ep_starts = torch.cat([self._ep_starts, pos[new]])
            self._scanned = ring.written
        if self._ep_starts.numel():
            ends = torch.cat([self._ep_starts[1:],
                              self._ep_starts.new_tensor([ring.written])])
            keep = ends > oldest
            self._ep_ids, self._ep_starts = self._ep_ids[keep], self._ep_starts[keep]

    def _episodes(self, ring: RingPosition) -> tuple[torch.Tensor, ...]:
        """(retained start positions, retained row counts, weights) of the stored episodes."""
        starts = self._ep_starts.clamp(min=ring.written - ring.stored)
        ends = torch.cat([self._ep_starts[1:], starts.new_tensor([ring.written])])
        rank = torch.arange(starts.numel(), dtype=torch.float64)
        dt = rank * self.transitions_per_episode + 1.0
        return starts, ends - starts, torch.sigmoid(2.0 * self.alpha * (ring.capacity / dt - 1.0))

    def weights(self, ages: torch.Tensor, ring: RingPosition) -> torch.Tensor:
        starts, _, weights = self._episodes(ring)
        episode = _searchsorted(starts, ring.written - ages) - 1
        return weights[episode.clamp(min=0)]

    def draw(self, count: int, ring: RingPosition, gen: torch.Generator | None,
             ) -> torch.Tensor:
        """An episode by weight x rows, then a row uniformly inside it."""
        starts, counts, weights = self._episodes(ring)
        episode = _inverse_cdf(torch.cumsum(weights * counts, 0), count, gen)
        n_rows = counts[episode]
        offset = (torch.rand(count, dtype=torch.float64, generator=gen) * n_rows).long()
        return ring.written - (starts[episode] + torch.minimum(offset, n_rows - 1))

    def hyper_parameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "transitions_per_episode": self.transitions_per_episode}

    def state_dict(self) -> dict[str, Any]:
        return {"scanned": self._scanned, "ep_ids": self._ep_ids.clone(),
                "ep_starts": self._ep_starts.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._scanned = int(state_dict["scanned"])
        self._ep_ids = torch.as_tensor(state_dict["ep_ids"], dtype=torch.long).clone()
        self._ep_starts = torch.as_tensor(state_dict["ep_starts"], dtype=torch.long).clone()


class RingSampler(Sampler):
    """A TorchRL :class:`Sampler` drawing the slots of a round-robin storage by their age.

    Ages ``1..n`` count back from the newest slot, learnt from the buffer's ``extend``/``add``.

    Args:
        weighting: the law over ages (an :class:`AgeWeighting`).
        valid_fn: optional ``valid_fn(slots) -> bool mask``; rejected draws are redrawn
            (exact for the law restricted to valid slots); not part of the state.
        max_rounds: redraw rounds before an exact ``O(n)`` pass over all slots.
    """

    def __init__(self, weighting: AgeWeighting, *,
                 valid_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_rounds: int = 64) -> None:
        self.weighting = weighting
        self.valid_fn = valid_fn
        self.max_rounds = int(max_rounds)
        self._empty()

    @property
    def mode(self) -> str:
        """The sampling mode (one of :data:`SAMPLER_MODES`)."""
        return self.weighting.mode

    # ------------------------------------------------------------------ bookkeeping
    def _empty(self) -> None:
        self._write_total = 0  # rows written through this sampler's buffer
        self._newest = -1  # slot of the newest row
        if isinstance(self.weighting, ReferenceEpisodeAges):
            self.weighting.empty()

    def add(self, index: int | torch.Tensor) -> None:
        """Records one written slot (called by the replay buffer on ``add``)."""
        self._write_total += 1
        self._newest = int(index)

    def extend(self, index: torch.Tensor) -> None:
        """Records written slots, in write order (called by the replay buffer on ``extend``)."""
        index = torch.as_tensor(index)
        if index.ndim > 1:
            raise ValueError(f"{type(self).__name__} supports 1-dimensional storages only")
        if index.numel() == 0:
            return
        self._write_total += index.numel()
        self._newest = int(index[-1])

    # --------------------------------------------------------------------- sampling
    def _exhaustive(self, count: int, ring: RingPosition, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact draws over the valid slots by an ``O(n)`` pass on the CPU (rarely needed)."""
        ages = torch.arange(1, ring.stored + 1, dtype=torch.long)
        slots = ring.slots(ages)
        weights = self.weighting.weights(ages, ring)
        if self.valid_fn is not None:
            weights = weights * self.valid_fn(slots.to(device)).cpu().to(torch.float64)
        cdf = torch.cumsum(weights, 0)
        if not bool(cdf[-1] > 0):
            raise RuntimeError(
                f"No valid slot to sample among the {ring.stored} stored rows "
                "(too little data written yet?)."
            )
        pick = _inverse_cdf(cdf, count, self._rng)
        return slots[pick], ages[pick]

    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        """``(index, {"age": ages})`` of ``batch_size`` slots drawn with replacement."""
        stored = len(storage)
        if stored == 0:
            raise RuntimeError("Cannot sample from an empty storage.")
        if storage.ndim != 1:
            raise ValueError(f"{type(self).__name__} supports 1-dimensional storages only")
        if self._newest < 0:
            raise RuntimeError(
                f"{type(self).__name__} has seen no write: the storage was filled without "
                "going through the replay buffer's extend/add (or the state was not restored)."
            )
        ring = RingPosition(self._write_total, self._newest, stored, storage.max_size)
        self.weighting.observe(storage, ring)
        device = _storage_device(storage)
        index = torch.empty(batch_size, dtype=torch.long, device=device)
        age = torch.empty(batch_size, dtype=torch.long, device=device)
        filled, rounds = 0, 0
        while filled < batch_size:
            need = batch_size - filled
            if rounds < self.max_rounds:
                ages = self.weighting.draw(need, ring, self._rng).to(device)
                slots = ring.slots(ages)
                if self.valid_fn is not None:
                    keep = self.valid_fn(slots)
                    slots, ages = slots[keep], ages[keep]  # a host read of the count
            else:
                slots, ages = (t.to(device) for t in self._exhaustive(need, ring, device))
            taken = slots.numel()
            index[filled : filled + taken] = slots
            age[filled : filled + taken] = ages
            filled += taken
            rounds += 1
        return index, {"age": age}

    def total_weight(self, storage: Storage) -> float:
        """Summed sampling weight of the stored rows, invalid slots included (the streams'
        split)."""
        stored = len(storage)
        if stored == 0 or self._newest < 0:
            return 0.0
        ring = RingPosition(self._write_total, self._newest, stored, storage.max_size)
        self.weighting.observe(storage, ring)
        return self.weighting.total(ring)

    def _sampleable_count(self, storage: Storage, batch_size: int) -> int:
        return len(storage)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Mode, settings, ring counters and the law's state (weight tables are derived)."""
        return {"mode": self.mode, **self.weighting.hyper_parameters(),
                "write_total": self._write_total, "newest": self._newest,
                **self.weighting.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the counters; warns when the saved mode or settings differ."""
        saved = {"mode": state_dict["mode"], **{k: state_dict[k] for k in
                                        self.weighting.hyper_parameters() if k in state_dict}}
        for key, value in saved.items():
            mine = self.mode if key == "mode" else self.weighting.hyper_parameters()[key]
            if value != mine:
                warnings.warn(
                    f"{type(self).__name__}: loading a state saved with {key}={value!r} "
                    f"into a sampler with {key}={mine!r}; keeping the latter.",
                    stacklevel=2,
                )
        self._write_total = int(state_dict["write_total"])
        self._newest = int(state_dict["newest"])
        if state_dict["mode"] == self.mode:
            self.weighting.load_state_dict(state_dict)

    def dumps(self, path: str | Path) -> None:
        """Writes the state to ``path/proximal_sampler.pt`` (TorchRL's PrioritizedSampler
        checkpointing needs its C++ extension)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / _STATE_FILE)

    def loads(self, path: str | Path) -> None:
        """Reads a state written by :meth:`dumps`."""
        self.load_state_dict(torch.load(Path(path) / _STATE_FILE, weights_only=True))

    def __repr__(self) -> str:
        settings = "".join(f", {k}={v}" for k, v in self.weighting.hyper_parameters().items())
        return f"{type(self).__name__}(mode={self.mode!r}{settings}, written={self._write_total})"


class ProximalSampler(RingSampler):
    """Prioritized proximal experience (CP3ER, arXiv 2410.00051): :class:`ProximalAges`.

    Examples:
        >>> import torch
        >>> from torchrl.data import LazyTensorStorage, ReplayBuffer
        >>> rb = ReplayBuffer(storage=LazyTensorStorage(1000), sampler=ProximalSampler())
        >>> _ = rb.extend(torch.arange(2500))  # wraps the ring twice
        >>> batch, info = rb.sample(256, return_info=True)
        >>> bool((info["age"] >= 1).all() and (info["age"] <= 1000).all())
        True
    """

    def __init__(self, alpha: float = 2.0, **kwargs: Any) -> None:
        super().__init__(ProximalAges(alpha), **kwargs)


def make_sampler(
    mode: str = "proximal",
    *,
    alpha: float = 2.0,
    transitions_per_episode: int = 1000,
    episode_key: str = "episode",
    valid_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_rounds: int = 64,
) -> RingSampler:
    """The sampler of a ``replay.sampler`` mode: ``"proximal"``, ``"reference"`` or
    ``"uniform"``."""
    if mode not in SAMPLER_MODES:
        raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
    weighting: AgeWeighting
    if mode == "proximal":
        weighting = ProximalAges(alpha)
    elif mode == "reference":
        weighting = ReferenceEpisodeAges(alpha, transitions_per_episode, episode_key)
    else:
        weighting = UniformAges()
    return RingSampler(weighting, valid_fn=valid_fn, max_rounds=max_rounds)


def _inverse_cdf(cdf: torch.Tensor, count: int, gen: torch.Generator | None) -> torch.Tensor:
    """``count`` indices drawn with probability proportional to the increments of ``cdf``."""
    u = torch.rand(count, dtype=torch.float64, generator=gen) * cdf[-1]
    return _searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)


def _searchsorted(sorted_seq: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(..., right=True)`` by NumPy: torch splits even small queries
    across threads (docs/performance.md, "Measurements behind code choices")."""
    found = np.searchsorted(sorted_seq.numpy(), values.numpy(), side="right")
    return torch.from_numpy(found.astype(np.int64, copy=False))


def _storage_device(storage: Storage) -> torch.device:
    """The device of a storage's tensors (the CPU for storages without one)."""
    device = getattr(storage, "device", "cpu")
    return torch.device("cpu" if device in (None, "auto") else device)


def storage_column(storage: Storage, key: str) -> torch.Tensor:
    """One column of a TensorDict-backed storage, without gathering the other keys (as
    TorchRL's ``StalenessAwareSampler`` reads it)."""
    if not isinstance(storage, TensorStorage) or storage._storage is None:
        raise TypeError(
            f"expected an initialised TensorDict-backed TensorStorage, got {type(storage)}"
        )
    return storage._storage.get(key)
