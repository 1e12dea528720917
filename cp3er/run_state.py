"""Run state beside :mod:`cp3er.checkpoint`: loop counters, RNG states, and which config and
checkpoint a (resumed) run uses. A checkpoint holds ``{"agent", "config", "counters",
"rng"}``, all plain containers and tensors."""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cp3er.checkpoint import UnsafePathError, first_line, has_checkpoint, load_run_checkpoint
from cp3er.config_schema import known_entries
from cp3er.logs import flatten_config


@dataclass
class LoopState:
    """The training loop's position, saved and restored as a whole.

    ``seconds`` and ``physics_errors`` count the run before this process; ``pending_metrics``
    holds update metrics not yet in a ``metrics.csv`` train row.
    """

    step: int = 0  # agent steps taken in the training env
    updates: int = 0
    episode: int = 0  # training episodes finished
    next_eval: int | None = None  # frame of the next evaluation (None: never)
    next_ckpt: int | None = None  # frame of the next periodic checkpoint (None: never)
    last_eval_frame: int = -1
    physics_errors: int = 0  # training-env steps whose physics failed
    seconds: float = 0.0  # wall time of the run
    pending_metrics: dict[str, list[float]] = field(default_factory=dict)

    def to_checkpoint(self) -> dict:
        """A plain dict for ``state["counters"]``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict) -> LoopState:
        """The loop state of a checkpoint's ``state``."""
        counters = dict(state["counters"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(counters) - names
        if unknown:
            raise KeyError(f"checkpoint counters {sorted(unknown)} are not LoopState fields")
        state = cls(**counters)
        state.pending_metrics = {k: list(v) for k, v in state.pending_metrics.items()}
        return state


# What a resume may take from its command line (docs/checkpoints.md, "Resume"): MACHINE_KEYS
# silently, RESUME_MAY_CHANGE with a printed line; any other difference is refused.
MACHINE_KEYS = ("run_dir", "device", "replay.device", "threads", "log.progress", "resume",
                "collector.ray_address")
RESUME_MAY_CHANGE = ("frames", "log", "perf", "collector.backend")


class ResumeError(ValueError):
    """A run folder that cannot be (re)started as asked; the message says what to do."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds libraries that use the legacy global RNG)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """torch, numpy and ``random`` states as tensors and plain containers (weights-only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32),  # noqa: NPY002
                         saved["pos"], saved["has_gauss"], saved["cached"]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def _load_saved_config(path: Path) -> DictConfig:
    try:
        saved = OmegaConf.load(path)
    except Exception as error:  # yaml and omegaconf raise several types
        raise ResumeError(f"cannot resume: {path} is unreadable ({first_line(error)}); "
                          "restore it from .hydra/config.yaml of the run or start a new "
                          "run_dir") from None
    if not isinstance(saved, DictConfig) or "task_name" not in saved:
        raise ResumeError(f"cannot resume: {path} is not a run's config (no task_name)")
    return saved


def resolve_run_config(
    cfg: DictConfig,
) -> tuple[DictConfig, dict | None, Path | None, list[str]]:
    """``(config, checkpoint state, replay folder, changes to print)`` of a run.

    ``resume=true``: the saved ``config.yaml`` plus the command line's :data:`MACHINE_KEYS`,
    :data:`RESUME_MAY_CHANGE` and entries the file predates; ``resume=false`` refuses a
    folder with a checkpoint; ``auto``: ``true`` iff there is one.
    """
    run_dir = Path(cfg.run_dir)
    resume = has_checkpoint(run_dir) if cfg.resume == "auto" else cfg.resume
    if not resume:
        if has_checkpoint(run_dir):
            raise ResumeError(
                f"run_dir={run_dir} already holds a run with checkpoints; pass resume=true to "
                "continue it, or another run_dir to start a new run"
            )
        return cfg, None, None, []
    if not has_checkpoint(run_dir):
        raise ResumeError(f"resume=true but run_dir={run_dir} has no checkpoint "
                          "(checkpoints/latest.pt) to resume from")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ResumeError(f"resume=true but {saved_path} is missing")
    saved = _load_saved_config(saved_path)
    old = flatten_config(OmegaConf.to_container(saved, resolve=True))
    new = flatten_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    differ = sorted(k for k in new if k in old and new[k] != old[k]
                    and not _under(k, MACHINE_KEYS))
    refused = [k for k in differ if not _under(k, RESUME_MAY_CHANGE)]
    if refused:
        detail = "; ".join(f"{k}: run has {old[k]!r}, command line {new[k]!r}"
                           for k in refused)
        raise ResumeError(f"cannot resume {run_dir}: the command line differs from the run's "
                          f"config.yaml ({detail}); resume with the run's settings (only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change) or start a new run_dir")
    state, replay = load_run_checkpoint(run_dir)
    frame = LoopState.from_checkpoint(state).step * old["env.action_repeat"]
    if new["frames"] < frame:
        raise ResumeError(f"cannot resume {run_dir} with frames={new['frames']}: its "
                          f"checkpoint is at frame {frame}")
    for key in (*differ, *(k for k in new if k not in old or _under(k, MACHINE_KEYS))):
        OmegaConf.update(saved, key, new[key], merge=False)
    changes = [f"{k}={new[k]!r} (the run had {old[k]!r})" for k in differ]
    try:  # the saved values on the composed (typed) config: Hydra's types and choices
        typed = OmegaConf.merge(cfg, known_entries(OmegaConf.to_container(saved, resolve=True),
                                                   OmegaConf.to_container(cfg)))
    except OmegaConfBaseException as error:
        raise ResumeError(f"cannot resume {run_dir}: its config.yaml holds a value this "
                          f"version refuses ({first_line(error)})") from None
    return typed, state, replay, changes


def prepare_run_dir(run_dir: Path) -> Path:
    """Create ``run_dir``; one-line :class:`ResumeError` if a file or not writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ResumeError(f"run_dir={run_dir} is not a folder (a file is in the way); "
                          "give a folder path") from None
    except OSError as error:
        raise ResumeError(f"run_dir={run_dir} cannot be created: {error.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ResumeError(f"run_dir={run_dir} is not writable by this user; give a writable "
                          "folder")
    return run_dir


#: What cp3er-train reads, writes and deletes in a run folder: never a symlink there.
RUN_FILES = frozenset({".lock", "config.yaml", "metrics.csv", "checkpoints", "replay", "eval",
                       ".hydra", "learning_curve.png"})


def refuse_outside_links(run_dir: Path) -> None:
    """:class:`~cp3er.checkpoint.UnsafePathError` for any symlink among :data:`RUN_FILES`
    (and under them), or elsewhere one that leaves the run folder."""
    root = os.path.realpath(run_dir)
    for folder, dirs, files in os.walk(run_dir):
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                continue
            relative = os.path.relpath(path, run_dir)
            target = os.path.realpath(path)
            if (relative.split(os.sep)[0] in RUN_FILES
                    or os.path.commonpath([root, target]) != root):
                raise UnsafePathError(
                    f"run_dir={run_dir} holds a symlink {relative} -> {os.readlink(path)}; "
                    "a run never reads or writes through links (remove it)")
