"""Run-folder logging: ``metrics.csv`` (the stable record) plus a TorchRL logger stream."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

# Fixed columns so every run's metrics.csv reads the same (glossary in docs/metrics.md).
METRIC_COLUMNS = [
    "frame", "step", "phase", "episode", "episode_return", "episode_length", "success",
    "seconds", "fps", "loss_critic", "loss_actor", "q_mean", "target_mean", "critic_std",
    "actor_q", "consistency_loss", "action_spread", "action_bound_frac", "physics_errors",
    "stddev", "loss_teacher",
]
LOGGER_BACKENDS = ("csv", "tensorboard", "wandb")


class MetricsWriter:
    """Append-only ``metrics.csv`` with a fixed header; each row is flushed and fsynced.

    ``truncate_after(frame)`` drops rows past a checkpoint's frame when a run resumes,
    so the file has neither duplicated nor missing rows. ``fresh=True`` (a new run): rows
    left by an earlier run in this folder that died before its first checkpoint are moved
    to ``metrics.stale<N>.csv`` (kept, never appended to), so the file holds this run only.
    """

    def __init__(self, path: str | Path, fresh: bool = False) -> None:
        self.path = Path(path)
        self.set_aside: Path | None = None
        self.columns = list(METRIC_COLUMNS)
        if fresh and self.path.exists() and self.rows():
            self.set_aside = _free_name(self.path)
            os.replace(self.path, self.set_aside)
        if not self.path.exists():
            self._write_all([])
            return
        # A run written by an older version keeps its columns (a resume never drops
        # recorded values); columns added since are appended to its header.
        with open(self.path, newline="") as handle:
            header = next(csv.reader(handle), [])
        self.columns = header + [c for c in METRIC_COLUMNS if c not in header]
        if self.columns != header:
            self._write_all(self.rows())

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def rows(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def truncate_after(self, frame: int) -> None:
        self._write_all([r for r in self.rows() if int(r["frame"]) <= frame])

    def write(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"metrics {sorted(unknown)} are not columns of metrics.csv")
        clean = {k: _fmt(v) for k, v in row.items()}
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow(clean)
            handle.flush()
            os.fsync(handle.fileno())


def _free_name(path: Path) -> Path:
    """``<stem>.stale<N><suffix>`` beside ``path``, the first N not taken."""
    index = 1
    while (candidate := path.with_name(f"{path.stem}.stale{index}{path.suffix}")).exists():
        index += 1
    return candidate


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, bool):
        return int(value)
    return value


def make_logger(backend: str, run_dir: Path, name: str):
    """A TorchRL logger writing under ``run_dir`` (``tb/`` for TensorBoard)."""
    from torchrl.record.loggers import get_logger

    if backend not in LOGGER_BACKENDS:
        raise ValueError(f"log.backend must be one of {LOGGER_BACKENDS}, got {backend!r}")
    if backend == "tensorboard":
        return get_logger("tensorboard", logger_name=str(run_dir), experiment_name="tb")
    if backend == "wandb":
        return get_logger("wandb", logger_name=str(run_dir), experiment_name=name,
                          wandb_kwargs={"dir": str(run_dir)})
    return get_logger("csv", logger_name=str(run_dir), experiment_name="logs")
