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
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from cp3er.run_data import (
    METRICS,
    PHASES,
    RANDOM_POLICY_FILE,
    SCORE_SCALE,
    Curve,
    PlotError,
    Run,
    check_choice,
    expand_run_dirs,
    final_scores,
    group_runs,
    learning_curves,
    load_run,
    non_finite_frames,
    normalize,
    read_metrics,
    run_series,
    warn,
)
from cp3er.stats import AGGREGATES, aggregate_metrics, pairwise_improvement

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


def summarize(run_dirs: Sequence[str | Path], out_png: str | Path,
              metric: str = "episode_return", phase: str = "eval", reps: int = 2000,
              seed: int = 0) -> dict:
    """The whole of ``cp3er-plot``: load, group, compute, draw; returns the JSON report."""
    check_choice("metric", metric, METRICS)
    check_choice("phase", phase, PHASES)
    unique: dict[Path, Path] = {}  # a folder given twice counts once
    for path in expand_run_dirs(run_dirs):
        unique.setdefault(Path(path).resolve(), Path(path))
    if not unique:
        raise PlotError("no run folders given")
    runs = [load_run(path) for path in unique.values()]
    left_out = _report_non_finite(runs, metric, phase)
    groups = group_runs(runs)
    if metric == "episode_return" and any(t.startswith("mw_") for t in groups):
        warn("Meta-World returns are not on DMC's 0-1000 scale; the aggregates divide "
              "them by 1000 anyway (use --metric success for Meta-World)")
    curves = learning_curves(groups, metric, phase, reps, seed)
    normalized = {agent: {t: normalize(s, metric) for t, s in by_task.items()}
                  for agent, by_task in sorted(final_scores(groups, metric).items())}
    aggregate = {agent: aggregate_metrics(by_task, reps, seed)
                 for agent, by_task in normalized.items()}
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
        "probability_of_improvement": pairwise_improvement(normalized, reps, seed),
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
                warn(f"{run.path / 'metrics.csv'}: {len(frames)} {which} row(s) with a "
                      f"non-finite {metric} (frames {shown}) left out of the curves and "
                      "final scores")
                left_out.append({"run": str(run.path), "phase": which, "frames": frames})
    return left_out


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
    for pair, value in report["probability_of_improvement"].items():
        low, high = value["ci"]
        lines.append(f"  P({pair}) {value['probability']:.3f} [{low:.3f}, {high:.3f}] "
                     f"over {len(value['tasks'])} tasks")
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
