"""Sampling the n-step replay buffer: storage slots -> transitions (frame stacks and n-step
returns rebuilt from the rows, DrQ-v2), on the storage's device."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from cp3er.replay.sampler import storage_column


class TransitionReader:
    """:class:`~cp3er.replay.buffer.NStepReplayBuffer`'s reading half."""

    def _columns(self) -> dict[str, torch.Tensor]:
        storage = self._rb.storage
        if len(storage) == 0:
            raise RuntimeError("The replay buffer is empty.")
        return {
            key: storage_column(storage, key)
            for key in ("frame", "action", "reward", "terminated", "final", "episode", "step")
        }

    def _locate(
        self, index: torch.Tensor, cols: dict[str, torch.Tensor], *, check: bool = True
    ) -> dict[str, torch.Tensor]:
        """Absolute position, n-step length, episode start and validity of slots;
        ``check``: refuse slots outside the storage (a host read)."""
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
        """:meth:`valid_mask` of drawn slots, unchecked (no host read)."""
        return self._locate(index, self._columns(), check=False)["valid"]

    def gather(self, index: torch.Tensor) -> TensorDict:
        """The transitions starting at storage slots ``index`` (all must be valid)."""
        cols = self._columns()
        loc = self._locate(index, cols)
        if not bool(loc["valid"].all()):
            raise ValueError(f"invalid transition starts: {loc['index'][~loc['valid']].tolist()}")
        return self._transitions(loc, cols)

    def _transitions(self, loc: dict[str, torch.Tensor], cols: dict[str, torch.Tensor]
                     ) -> TensorDict:
        """Frame stacks, action and n-step return of located valid slots."""
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
        # where, not a mask product: rows past the head may be uninitialised (NaN * 0 = NaN)
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
        """Draws a batch with the configured sampler."""
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        index, _ = self.sampler.sample(self._rb.storage, batch_size)
        # the sampler returns only slots valid_mask accepted: no second check (host reads)
        cols = self._columns()
        return self._transitions(self._locate(index, cols, check=False), cols)


def _take(column: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``column[index]`` by ``index_select``, faster than advanced indexing on large rows
    (docs/performance.md, "Measurements behind code choices")."""
    out = column.index_select(0, index.reshape(-1))
    return out.reshape(*index.shape, *column.shape[1:])
