"""Writing the n-step replay buffer: a collector batch -> storage rows (one per step, plus a
final-frame row per episode end; docs/implementation.md, "The replay buffer")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase


@dataclass
class _Segments:
    """Per-step episode bookkeeping of one ``[T]`` collector batch."""

    terminated: torch.Tensor
    truncated: torch.Tensor
    done: torch.Tensor  # terminated or truncated: the episode ends after this step
    episode: torch.Tensor  # episode id
    step: torch.Tensor  # step in the episode
    traj: torch.Tensor | None  # the collector's trajectory ids, where given



class RowWriter:
    """:class:`~cp3er.replay.buffer.NStepReplayBuffer`'s writing half (``extend``)."""

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
        """Writes a ``[T]`` or ``[1, T]`` collector batch; returns the written slots and sets
        :attr:`episode_ends` (``[T]``). Rows are built on the CPU, copied over in one transfer.
        """
        if batch.batch_dims == 2 and batch.shape[0] == 1:
            batch = batch[0]
        if batch.batch_dims != 1:
            raise ValueError(
                "NStepReplayBuffer takes the [T] batches of a single-environment collector "
                f"(episodes must be contiguous in the ring); got batch shape {batch.shape}"
            )
        if batch.shape[0] == 0:
            self.episode_ends = torch.zeros(0, dtype=torch.bool)
            return torch.zeros(0, dtype=torch.long)
        batch = batch.to("cpu")
        segments = self._segment(batch)
        self.episode_ends = segments.done
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
        """Per-step end flags, episode ids and steps. An episode starts after a done, at a
        traj-id change, or at the first step unless it continues the pending episode."""
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
        """Each step's row, plus a final-frame row after each episode end."""
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
