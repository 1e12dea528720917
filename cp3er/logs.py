"""Run-folder logging: ``metrics.csv`` (the stable record) plus a TorchRL logger stream."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

from agents.metrics import UPDATE_METRICS
from cp3er.choices import LOGGER_BACKENDS

# Fixed columns so every run's metrics.csv reads the same (glossary: docs/usage.md,
# "metrics.csv glossary"): the loop's own, the agents' registered update metrics, then the
# environment's.
METRIC_COLUMNS = [
    "frame", "step", "phase", "episode", "episode_return", "episode_length", "success",
    "seconds", "fps", *UPDATE_METRICS, "physics_errors",
]


class MetricsFileError(ValueError):
    """A ``metrics.csv`` that cannot be parsed (the message names the file and row)."""


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
        if fresh and self.path.exists() and self._has_rows():
            self.set_aside = _free_name(self.path)
            os.replace(self.path, self.set_aside)
        if not self.path.exists():
            self._write_all([])
            return
        # A run written by an older version keeps its columns (a resume never drops
        # recorded values); columns added since are appended to its header.
        header = self._header()
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

    def _damaged(self, detail: str) -> MetricsFileError:
        return MetricsFileError(f"{self.path} is damaged ({detail}); move it aside to go on "
                                "(the run's checkpoint does not depend on it)")

    def _header(self) -> list[str]:
        try:
            with open(self.path, newline="") as handle:
                header = next(csv.reader(handle), [])
        except (csv.Error, UnicodeDecodeError) as error:
            raise self._damaged(str(error)) from None
        if "frame" not in header:
            raise self._damaged(f"its header has no 'frame' column: {header[:5]}")
        return header

    def _has_rows(self) -> bool:
        try:
            return bool(self.rows())
        except MetricsFileError:  # a damaged file of an earlier run is set aside too
            return True

    def rows(self) -> list[dict[str, str]]:
        try:
            with open(self.path, newline="") as handle:
                return list(csv.DictReader(handle))
        except (csv.Error, UnicodeDecodeError) as error:
            raise self._damaged(str(error)) from None

    def truncate_after(self, frame: int) -> None:
        rows = self.rows()
        for number, row in enumerate(rows, start=2):
            if None in row:
                raise self._damaged(f"line {number} has more fields than the header")
            try:
                row["_frame"] = int(row["frame"])
            except (TypeError, ValueError):
                raise self._damaged(f"line {number}: frame={row['frame']!r}") from None
        self._write_all([{k: v for k, v in r.items() if k != "_frame"} for r in rows
                         if r["_frame"] <= frame])

    def write(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"metrics {sorted(unknown)} are not columns of metrics.csv")
        clean = {k: _fmt(v) for k, v in row.items()}
        try:
            with open(self.path, "a", newline="") as handle:
                csv.DictWriter(handle, self.columns).writerow(clean)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:  # a full disk: the message names the file
            raise OSError(error.errno, error.strerror, str(self.path)) from None


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


def close_logger_files(logger, name: str) -> Path | str:
    """After a write of scalar ``name`` failed (a full disk): close the TorchRL CSV
    logger's open files, ignoring their failing flushes, so that no ``__del__`` flushes
    them again at exit (an "Exception ignored" traceback after the one-line error).
    Returns the file (CSV logger) or folder the scalar went to, for the message."""
    experiment = getattr(logger, "experiment", None)
    files = getattr(experiment, "files", None)
    if isinstance(files, dict):
        for handle in files.values():
            with contextlib.suppress(OSError):
                handle.close()  # closed even when its flush fails
        files.clear()
    log_dir = getattr(experiment, "log_dir", None) or getattr(logger, "log_dir", None)
    if log_dir is None:
        return f"the {type(logger).__name__}'s files"
    return Path(log_dir) / "scalars" / f"{name}.csv" if isinstance(files, dict) \
        else Path(log_dir)


def log_scalars(logger, values: dict[str, float], step: int) -> None:
    """``logger.log_scalar`` each value; a failed write (a full disk) names its file."""
    for name, value in values.items():
        try:
            logger.log_scalar(name, value, step=step)
        except OSError as error:  # nothing left to flush at exit
            raise OSError(error.errno, error.strerror,
                          str(close_logger_files(logger, name))) from None


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


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b": value}`` (an empty mapping stays one entry)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _hyper_parameters(config: dict) -> dict[str, Any]:
    """The flattened config with every non-scalar value (lists, null) as text."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten_config(config).items()}


def log_config(logger, backend: str, config: dict) -> None:
    """The run's resolved config to the logger: hyper-parameters (flattened ``a.b`` keys)
    for csv (``texts/hparams.txt``) and wandb (``run.config``), the YAML as text for
    TensorBoard (its ``add_hparams`` needs final metrics; the Text tab shows the config)."""
    if backend == "tensorboard":
        from omegaconf import OmegaConf

        yaml = OmegaConf.to_yaml(OmegaConf.create(config))
        logger.experiment.add_text("config", "    " + yaml.replace("\n", "\n    "), 0)
    elif backend == "wandb":
        logger.experiment.config.update(_hyper_parameters(config), allow_val_change=True)
    else:
        logger.log_hparams(_hyper_parameters(config))


def log_eval_video(logger, backend: str, gif: Path, step: int) -> None:
    """An evaluation episode's GIF (already written to ``eval/``) to TensorBoard (an
    animated image summary, what ``add_video`` writes) or wandb (``wandb.Video``); csv
    has the GIF itself.

    Written here rather than through TorchRL's ``log_video``: on TensorBoard that needs
    moviepy 1.x (``moviepy.editor``, gone from moviepy 2) to encode a GIF we already have,
    and wandb's encoder needs moviepy as well; both take the GIF file as it is."""
    if backend == "tensorboard":
        from PIL import Image
        from torch.utils.tensorboard.summary import Summary

        with Image.open(gif) as image:
            width, height = image.size
        encoded = Summary.Image(height=height, width=width, colorspace=3,
                                encoded_image_string=gif.read_bytes())
        summary = Summary(value=[Summary.Value(tag="eval/video", image=encoded)])
        logger.experiment._get_file_writer().add_summary(summary, step)
    elif backend == "wandb":
        import wandb

        logger.experiment.log({"eval/video": wandb.Video(str(gif), format="gif")}, step=step)


def quiet_torchrl() -> None:
    """Keep the console to the CLIs' own lines: TorchRL's INFO messages (a coloured
    "Initialized LazyTensorStorage" line per run) are dropped, its warnings kept."""
    logging.getLogger("torchrl").setLevel(logging.WARNING)

