"""``cp3er-plot``: learning curves and aggregate metrics (IQM with CIs) of training runs.

``cp3er-plot <run_dir>... --out <png> [--metric episode_return|success] [--phase eval|train]
[--json]`` groups the run folders of ``cp3er-train`` by task and agent (or ``label``), seeds
as replicates, and draws one PNG: per task, each agent's mean curve over seeds with a 95%
bootstrap CI band; across tasks, the IQM, mean and optimality gap of the runs' final
evaluation scores with 95% stratified-bootstrap CIs (rliable: Agarwal et al., "Deep
Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021). Scores are
``episode_return / 1000`` (DMC's maximum; for Meta-World use ``--metric success``), the gap
``mean(max(0, 1 - score))``. ``--json`` prints the report as one JSON object, else a table;
bad inputs are one line on stderr and exit status 2. Details: docs/usage.md, "cp3er-plot".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cp3er.stats import AGGREGATES, aggregate_metrics, bootstrap_mean_ci

__all__ = [
    "METRICS",
    "PHASES",
    "Curve",
    "PlotError",
    "Run",
    "final_scores",
    "learning_curves",
    "load_run",
    "main",
    "normalize",
    "plot_comparison",
    "plot_learning_curve",
    "run_series",
    "summarize",
]

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
    _check_choice("metric", metric, METRICS)
    _check_choice("phase", phase, PHASES)
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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
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
    _check_choice("metric", metric, METRICS)
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
                _warn(f"{agent} on {task}: runs end at frames {min(last_frames)}.."
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


# -- figures ----------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    """A Figure on the Agg canvas, without touching pyplot's global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def _frames_axis(ax) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("frames")
    ax.grid(alpha=0.3)


def plot_comparison(curves: dict[str, dict[str, Curve]], aggregate: dict[str, dict],
                    out_png: str | Path, metric: str, phase: str) -> Path:
    """One panel per task (curves with CI bands) and an aggregate panel (IQM, mean, gap)."""
    agents = sorted({a for by_agent in curves.values() for a in by_agent})
    colors = {a: f"C{i % 10}" for i, a in enumerate(agents)}
    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure = _new_figure(4.2 * max(columns, 3), 3.2 * rows + 2.0 + 0.25 * len(agents))
    grid = figure.add_gridspec(rows + 1, columns,
                               height_ratios=[3.2] * rows + [1.6 + 0.25 * len(agents)])
    for index, (task, by_agent) in enumerate(curves.items()):
        ax = figure.add_subplot(grid[index // columns, index % columns])
        for agent, curve in by_agent.items():
            style = "-o" if curve.frames.size == 1 else "-"
            ax.plot(curve.frames, curve.mean, style, color=colors[agent],
                    label=f"{agent} ({curve.seeds} seeds)")
            ax.fill_between(curve.frames, curve.ci_low, curve.ci_high, color=colors[agent],
                            alpha=0.2, linewidth=0)
        ax.set_title(task)
        ax.set_ylabel(f"{phase} {metric}")
        _frames_axis(ax)
        ax.legend(fontsize="small")
    _plot_aggregate(figure, grid[rows, :], aggregate, colors, metric)
    return _save(figure, out_png)


def _plot_aggregate(figure, cell, aggregate: dict[str, dict], colors: dict[str, str],
                    metric: str) -> None:
    """rliable-style interval plot: a CI bar and a point-estimate tick per agent."""
    titles = {"iqm": "IQM", "mean": "Mean", "optimality_gap": "Optimality gap (lower is better)"}
    scale = "return / 1000" if metric == "episode_return" else "success rate"
    axes = cell.subgridspec(1, len(titles)).subplots(sharey=True)
    agents = list(aggregate)
    for ax, (name, title) in zip(axes, titles.items(), strict=True):
        for row, agent in enumerate(agents):
            low, high = aggregate[agent][f"{name}_ci"]
            ax.barh(row, high - low, left=low, height=0.6, color=colors[agent], alpha=0.75)
            ax.vlines(aggregate[agent][name], row - 0.3, row + 0.3, color="black")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(f"normalized score ({scale})")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(agents)), agents)
    axes[0].invert_yaxis()


def plot_learning_curve(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """One run's eval and train returns (and eval success) vs frames, with the random
    policy's return if measured (:data:`RANDOM_POLICY_FILE`); returns the PNG's path
    (default ``<run_dir>/learning_curve.png``)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    run = Run(run_dir, run_dir.name, "", "", None, rows)
    series = {}
    for phase, metric in (("eval", "episode_return"), ("train", "episode_return"),
                          ("eval", "success")):
        try:
            series[phase, metric] = run_series(run, metric, phase)
        except PlotError:
            continue
    panels = 2 if ("eval", "success") in series else 1
    figure = _new_figure(6.0 * panels, 3.8)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    if ("train", "episode_return") in series:
        axes[0].plot(*series["train", "episode_return"], ".-", color="C0", alpha=0.45,
                     markersize=2, label="train")
    if ("eval", "episode_return") in series:
        axes[0].plot(*series["eval", "episode_return"], "-o", color="C1", markersize=3,
                     label="eval (mean over episodes)")
    reference = _random_reference(run_dir)
    if reference is not None:
        episodes = int(reference["episodes"])
        axes[0].axhline(reference["return_mean"], color="0.35", linestyle="--", linewidth=1,
                        label=f"uniform random actions ({reference['return_mean']:.1f}, "
                              f"{episodes} episode{'' if episodes == 1 else 's'})")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    if not series:
        axes[0].text(0.5, 0.5, "no finished episodes yet", ha="center", va="center",
                     transform=axes[0].transAxes)
    axes[0].set_ylabel("episode return")
    if panels == 2:
        axes[1].plot(*series["eval", "success"], "-o", color="C2", markersize=3)
        axes[1].set_ylabel("eval success rate")
        axes[1].set_ylim(-0.05, 1.05)
    for ax in axes:
        _frames_axis(ax)
    figure.suptitle(_run_title(run_dir))
    return _save(figure, out_png or run_dir / "learning_curve.png")


def _random_reference(run_dir: Path) -> dict | None:
    """The run's :data:`RANDOM_POLICY_FILE` summary, ``None`` if absent or unreadable."""
    try:
        reference = json.loads((run_dir / RANDOM_POLICY_FILE).read_text())
        int(reference["episodes"])
        return reference if math.isfinite(float(reference["return_mean"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_title(run_dir: Path) -> str:
    try:
        run = load_run(run_dir)
    except (PlotError, OSError, ValueError):
        return run_dir.name
    return f"{run.task} · {run.agent} · {run.obs} · seed {run.seed}"


# -- command line -----------------------------------------------------------------------


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


def summarize(run_dirs: Sequence[str | Path], out_png: str | Path,
              metric: str = "episode_return", phase: str = "eval", reps: int = 2000,
              seed: int = 0) -> dict:
    """The whole of ``cp3er-plot``: load, group, compute, draw; returns the JSON report."""
    _check_choice("metric", metric, METRICS)
    _check_choice("phase", phase, PHASES)
    unique: dict[Path, Path] = {}  # a folder given twice counts once
    for path in expand_run_dirs(run_dirs):
        unique.setdefault(Path(path).resolve(), Path(path))
    if not unique:
        raise PlotError("no run folders given")
    runs = [load_run(path) for path in unique.values()]
    left_out = _report_non_finite(runs, metric, phase)
    groups = group_runs(runs)
    if metric == "episode_return" and any(t.startswith("mw_") for t in groups):
        _warn("Meta-World returns are not on DMC's 0-1000 scale; the aggregates divide "
              "them by 1000 anyway (use --metric success for Meta-World)")
    curves = learning_curves(groups, metric, phase, reps, seed)
    aggregate = {
        agent: aggregate_metrics({t: normalize(s, metric) for t, s in by_task.items()},
                                 reps, seed)
        for agent, by_task in sorted(final_scores(groups, metric).items())
    }
    if len(unique) == 1:
        # one run: its own eval and train curves; aggregates of a single score would be
        # panels with nothing to compare
        out = plot_learning_curve(next(iter(unique.values())), out_png)
    else:
        out = plot_comparison(curves, aggregate, out_png, metric, phase)
    return {
        "curves": {t: {a: c.to_json() for a, c in by_agent.items()}
                   for t, by_agent in curves.items()},
        "aggregate": aggregate,
        "metric": metric,
        "phase": phase,
        "normalization": f"{metric} / {SCORE_SCALE[metric]:g}",
        "out": str(out),
        "figure": "single run" if len(unique) == 1 else "comparison",
        "left_out": left_out,
    }


def _report_non_finite(runs: Sequence[Run], metric: str, phase: str) -> list[dict]:
    """A warning per run and phase whose rows hold a non-finite ``metric`` (left out of the
    curves and the final scores), and those rows for the JSON report."""
    left_out = []
    for run in runs:
        for which in dict.fromkeys((phase, "eval")):  # the curves', the final scores'
            frames = non_finite_frames(run, metric, which)
            if frames:
                shown = ", ".join(map(str, frames[:5])) + (", ..." if len(frames) > 5 else "")
                _warn(f"{run.path / 'metrics.csv'}: {len(frames)} {which} row(s) with a "
                      f"non-finite {metric} (frames {shown}) left out of the curves and "
                      "final scores")
                left_out.append({"run": str(run.path), "phase": which, "frames": frames})
    return left_out


def _warn(message: str) -> None:
    print(f"cp3er-plot: warning: {message}", file=sys.stderr)


def _table(report: dict) -> str:
    if report["figure"] == "single run":
        (task, by_agent), = report["curves"].items()
        (agent, curve), = by_agent.items()
        return (f"wrote {report['out']} (one run: its eval and train curves)\n"
                f"  {agent} on {task}: final {report['metric']} {curve['mean'][-1]:.3f} "
                f"at frame {curve['frames'][-1]:,}")
    lines = [f"wrote {report['out']}",
             f"final {report['metric']} ({report['normalization']}), 95% stratified-bootstrap CIs:"]
    for agent, agg in report["aggregate"].items():
        cells = [f"{name} {agg[name]:.3f} [{agg[name + '_ci'][0]:.3f}, {agg[name + '_ci'][1]:.3f}]"
                 for name in AGGREGATES]
        lines.append(f"  {agent} ({agg['runs']} runs, {len(agg['tasks'])} tasks): "
                     + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cp3er-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="run_dir",
                        help="run folders, or folders holding them (a grid, a sweep)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--metric", default="episode_return", help=" | ".join(METRICS))
    parser.add_argument("--phase", default="eval", help=" | ".join(PHASES) + " (curves only)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    try:
        report = summarize(args.run_dirs, args.out, args.metric, args.phase, args.reps, args.seed)
    except PlotError as error:
        print(f"cp3er-plot: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
