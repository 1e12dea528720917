"""What a training run's ``metrics.csv`` rows are made of: the update metrics (kept on the
device, read in batches) and the episodes a collected batch finished."""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDictBase

from agents.metrics import LOSS_METRICS, UPDATE_METRICS
from cp3er.faults import Q_METRICS, check_finite_losses, check_finite_parameters


class UpdateMetrics:
    """Loss -> train row: each update's metrics stay on the device until :meth:`read`
    (every ``every`` updates, and before a row or a checkpoint) takes them to the host in
    one transfer, stops the run on a NaN/inf loss or parameter (naming the update), and
    queues them into ``queued`` (the loop state's, checkpointed) for :meth:`means`."""

    def __init__(self, module: torch.nn.Module, every: int, queued: dict[str, list[float]]
                 ) -> None:
        self.module, self.every, self.queued = module, every, queued
        self._unread: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def add(self, update: int, frame: int, metrics: dict[str, torch.Tensor]) -> None:
        self._unread.append((update, frame, metrics))
        if len(self._unread) >= self.every:
            self.read()

    def read(self) -> None:
        if not self._unread:
            return
        names = list(self._unread[-1][2])
        unknown = set(names) - set(UPDATE_METRICS)
        if unknown:  # a loss reporting a name the csv and the glossary do not know
            raise KeyError(f"update metrics {sorted(unknown)} are not in "
                           "agents.metrics.UPDATE_METRICS")
        values = torch.stack([torch.stack([m[n].float() for n in names])
                              for _, _, m in self._unread]).cpu()  # [updates, metrics]
        for (update, frame, _), row in zip(self._unread, values.tolist(), strict=True):
            check_finite_losses(dict(zip(names, row, strict=True)), (*LOSS_METRICS, *Q_METRICS),
                                update=update, frame=frame)
        last_update, last_frame, _ = self._unread[-1]
        check_finite_parameters(self.module, update=last_update, frame=last_frame)
        for name, column in zip(names, values.T.tolist(), strict=True):
            self.queued.setdefault(name, []).extend(column)
        self._unread.clear()

    def means(self) -> dict[str, float]:
        """The mean of each metric since the last row (then forgotten): the next train row's."""
        self.read()
        means = {name: float(np.mean(values)) for name, values in self.queued.items()}
        self.queued.clear()
        return means


def finished_episodes(rows: TensorDictBase, done: torch.Tensor, step_before: int,
                      succeeded: set[int]) -> list[tuple[int, float, int, bool | None]]:
    """``(step, return, length, success)`` of each episode ending in ``rows`` (``[W, T]``:
    ``W`` workers in lockstep, or one worker's chunk), in step order: an episode ending at
    step ``t`` gets ``step_before + (t + 1) * W``. ``success``: the episode succeeded at any
    step (Meta-World), ``None`` without a success key; ``succeeded`` carries the trajectory
    ids that succeeded so far across batches."""
    workers, steps = rows.shape
    success = rows.get(("next", "success"), None)
    success = None if success is None else success.reshape(workers, steps)
    traj = rows.get(("collector", "traj_ids"), None)
    traj = (torch.zeros(workers, steps, dtype=torch.long) if traj is None
            else traj.reshape(workers, steps))
    returns = rows["next", "episode_reward"].reshape(workers, steps)
    lengths = rows["next", "step_count"].reshape(workers, steps)
    done = done.reshape(workers, steps)
    ended = []
    for t in range(steps):
        for w in range(workers):
            episode = int(traj[w, t])
            if success is not None and bool(success[w, t]):
                succeeded.add(episode)
            if done[w, t]:
                ended.append((step_before + (t + 1) * workers, float(returns[w, t]),
                              int(lengths[w, t]),
                              None if success is None else episode in succeeded))
                succeeded.discard(episode)
    return ended
