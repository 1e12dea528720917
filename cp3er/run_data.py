"""Reading ``cp3er-train`` run folders: ``config.yaml`` and ``metrics.csv`` rows, eval
series, final scores normalised to [0, 1] and mean learning curves with bootstrap bands
(what ``cp3er-plot``, ``benchmarks/collect.py`` and the console read; no drawing)."""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cp3er.stats import bootstrap_mean_ci

METRICS = ("episode_return", "success")
PHASES = ("eval", "train")
# Divisor that maps a metric to a [0, 1] normalized score for the aggregates.
SCORE_SCALE = {"episode_return": 1000.0, "success": 1.0}
#: A run's uniform-random-policy reference (``cp3er.console.random_reference``), drawn on
#: its learning curve: ``cp3er.evaluate.summarize``'s JSON.
RANDOM_POLICY_FILE = Path("eval") / "random_policy.json"


class PlotError(ValueError):
    """A user-facing problem with the inputs (printed as one line by ``cp3er-plot``)."""


@dataclass
class Run:
    """One run folder: its identity from ``config.yaml`` and the rows of ``metrics.csv``."""

    path: Path
    task: str
    agent: str
    obs: str
    seed: int | None
    rows: list[dict[str, str]] = field(repr=False)


@dataclass
class Curve:
    """Mean over seeds and its bootstrap CI band on a common frame grid."""

    frames: np.ndarray
    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    seeds: int

    def to_json(self) -> dict:
        return {
            "frames": [int(f) for f in self.frames],
            "mean": self.mean.tolist(),
            "ci_low": self.ci_low.tolist(),
            "ci_high": self.ci_high.tolist(),
            "seeds": self.seeds,
        }


# -- reading run folders ----------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``<run_dir>/metrics.csv``; :class:`PlotError` naming the path if absent."""
    path = Path(run_dir) / "metrics.csv"
    if not Path(run_dir).exists():
        raise PlotError(f"no such run folder: {run_dir}")
    if not path.is_file():
        raise PlotError(f"no metrics.csv in {run_dir} (expected a run folder of cp3er-train)")
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:  # binary or NUL bytes: not a CSV
        raise PlotError(f"{path} is not a metrics CSV written by cp3er-train "
                        f"({type(error).__name__}: {_first_line(error)})") from None


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder: ``config.yaml`` (task, agent or ``label``, obs, seed) and
    ``metrics.csv``."""
    from omegaconf import DictConfig, OmegaConf

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise PlotError(f"no config.yaml in {run_dir} (needed to group runs by task and agent)")
    try:
        cfg = OmegaConf.load(config_path)
    except Exception as error:  # yaml and omegaconf raise several types
        raise PlotError(f"{config_path} is not a readable run config "
                        f"({_first_line(error)})") from None
    if not isinstance(cfg, DictConfig):
        raise PlotError(f"{config_path} is not a run config (a mapping with task_name and "
                        "agent.name)")
    task = OmegaConf.select(cfg, "task_name")
    agent = OmegaConf.select(cfg, "label", default=None) or OmegaConf.select(cfg, "agent.name")
    if task is None or agent is None:
        raise PlotError(f"{config_path} lacks task_name or agent.name")
    seed = OmegaConf.select(cfg, "seed")
    return Run(run_dir, str(task), str(agent), str(OmegaConf.select(cfg, "obs", default="")),
               None if seed is None else int(seed), rows)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _value(cell: str | None) -> float:
    if cell is None or cell.strip() == "":
        return math.nan
    return float(cell)


def eval_rows(run: Run) -> list[dict[str, str]]:
    """``run``'s evaluation rows that logged a return, in the order logged (the last one is
    the run's final evaluation)."""
    return [r for r in run.rows if r["phase"] == "eval" and r["episode_return"]]


def run_series(run: Run, metric: str, phase: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Frames (increasing, unique) and ``metric`` values of ``run``'s ``phase`` rows.

    Empty cells are skipped; rows logged twice at one frame are averaged.
    """
    check_choice("metric", metric, METRICS)
    check_choice("phase", phase, PHASES)
    try:
        pairs = [(int(r["frame"]), _value(r.get(metric)))
                 for r in run.rows if r.get("phase") == phase]
    except (KeyError, TypeError, ValueError) as error:
        raise PlotError(f"{run.path / 'metrics.csv'} is malformed: {error!r}") from error
    pairs = [(f, v) for f, v in pairs if math.isfinite(v)]
    if not pairs:
        hint = " (success is logged for Meta-World only)" if metric == "success" else ""
        raise PlotError(f"{run.path / 'metrics.csv'} has no {phase} rows with a {metric} value"
                        f"{hint}")
    frames, values = np.asarray(pairs, dtype=np.float64).T
    unique, inverse = np.unique(frames, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    return unique, sums / np.bincount(inverse)


def non_finite_frames(run: Run, metric: str, phase: str) -> list[int]:
    """Frames of ``run``'s ``phase`` rows whose ``metric`` cell holds a value that is not
    finite (``nan``, ``inf``): :func:`run_series` leaves them out, :func:`summarize` says
    so. Empty cells (a metric not logged) are not counted."""
    frames = []
    for row in run.rows:
        if row.get("phase") != phase or not (row.get(metric) or "").strip():
            continue
        try:
            if not math.isfinite(float(row[metric])):
                frames.append(int(row["frame"]))
        except (KeyError, TypeError, ValueError):
            continue  # a malformed row: run_series names it
    return frames


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PlotError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def group_runs(runs: Iterable[Run]) -> dict[str, dict[str, list[Run]]]:
    """``{task: {agent: [runs]}}`` (sorted); seeds of one (task, agent) are replicates."""
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.task][run.agent].append(run)
    for task, agents in groups.items():
        for agent, members in agents.items():
            if len({r.obs for r in members}) > 1:
                raise PlotError(f"runs of {agent} on {task} mix observation types "
                                f"{sorted({r.obs for r in members})}; plot them separately")
    return {t: {a: groups[t][a] for a in sorted(groups[t])} for t in sorted(groups)}


# -- scores ----------------------------------------------------------------------------


def normalize(scores: np.ndarray, metric: str) -> np.ndarray:
    """Normalized score: ``episode_return / 1000`` (DMC's maximum); ``success`` unchanged."""
    check_choice("metric", metric, METRICS)
    return np.asarray(scores, dtype=np.float64) / SCORE_SCALE[metric]


def final_scores(groups: dict[str, dict[str, list[Run]]], metric: str,
                 ) -> dict[str, dict[str, np.ndarray]]:
    """``{agent: {task: last evaluation score of each seed}}`` (raw, not normalized)."""
    scores: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for task, agents in groups.items():
        for agent, runs in agents.items():
            ends = [run_series(run, metric, "eval") for run in runs]
            last_frames = {int(frames[-1]) for frames, _ in ends}
            if len(last_frames) > 1:
                warn(f"{agent} on {task}: runs end at frames {min(last_frames)}.."
                      f"{max(last_frames)}; each run's last evaluation is its final score")
            scores[agent][task] = np.array([values[-1] for _, values in ends])
    return dict(scores)


def learning_curves(groups: dict[str, dict[str, list[Run]]], metric: str, phase: str = "eval",
                    reps: int = 2000, seed: int = 0, max_points: int = 1000,
                    ) -> dict[str, dict[str, Curve]]:
    """``{task: {agent: Curve}}``: seeds interpolated on a common grid, mean and bootstrap CI."""
    rng = np.random.default_rng(seed)
    curves: dict[str, dict[str, Curve]] = {}
    for task, agents in groups.items():
        curves[task] = {}
        for agent, runs in agents.items():
            series = [run_series(run, metric, phase) for run in runs]
            grid = _common_grid([frames for frames, _ in series], max_points)
            if grid.size == 0:
                raise PlotError(f"the {phase} frames of {agent} on {task} do not overlap "
                                "across seeds")
            values = np.stack([np.interp(grid, frames, ys) for frames, ys in series])
            low, high = bootstrap_mean_ci(values, reps, rng)
            curves[task][agent] = Curve(grid, values.mean(axis=0), low, high, len(runs))
    return curves


def _common_grid(frames: list[np.ndarray], max_points: int) -> np.ndarray:
    start = max(f[0] for f in frames)
    stop = min(f[-1] for f in frames)
    union = np.unique(np.concatenate(frames))
    grid = union[(union >= start) & (union <= stop)]
    if grid.size > max_points:
        grid = np.unique(np.round(np.linspace(start, stop, max_points)))
    return grid


# -- finding run folders ---------------------------------------------------------------


def find_run_dirs(folder: str | Path) -> list[Path]:
    """Every run folder (``metrics.csv`` + ``config.yaml``) under ``folder``, sorted: a
    grid's or a Hydra sweep's output folder."""
    found = sorted(p.parent for p in Path(folder).rglob("metrics.csv")
                   if (p.parent / "config.yaml").is_file())
    if not found:
        raise PlotError(f"no run folders (metrics.csv + config.yaml) under {folder}")
    return found


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """``paths`` with each folder that is not a run folder itself (no ``metrics.csv``)
    replaced by the run folders under it (:func:`find_run_dirs`)."""
    out: list[Path] = []
    for path in map(Path, paths):
        out += [path] if (path / "metrics.csv").is_file() or not path.is_dir() \
            else find_run_dirs(path)
    return out


def warn(message: str) -> None:
    print(f"cp3er-plot: warning: {message}", file=sys.stderr)
