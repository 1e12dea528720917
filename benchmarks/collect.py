"""Collect a task x agent x seed grid of run folders into a CSV, a Markdown table and a PNG.

``python benchmarks/collect.py <grid_dir> --out <prefix> [--min-frames N] [--seeds 1,2]``
reads the run folders under ``grid_dir`` that have an evaluation (others: a line on
stderr) and writes ``<prefix>.csv`` (a row per run, with its ``cp3er-train`` command from Hydra's
``overrides.yaml`` less ``resume`` and ``log.progress``: a resumed run is the same run;
``bound_frac_end`` / ``spread_end`` are means over the train rows of its last 10% of
frames), ``<prefix>_table.md`` (mean final return per task and agent, 95% bootstrap CI over
seeds), ``<prefix>.png`` and ``<prefix>_aggregate.json`` (``cp3er-plot``'s curves and
aggregates) and ``<prefix>_collapse.png`` (``action_bound_frac`` and ``action_spread`` of
the train rows over frames, a panel per task and metric). ``--min-frames``: a run whose
last evaluation is before frame N keeps its CSV row only; without it every run's last
evaluation is its final score, whatever frame it reached. ``--seeds``: likewise for runs of
other seeds (a balanced comparison while a later seed is still running).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from cp3er.plot import summarize
from cp3er.run_data import PlotError, eval_rows, find_run_dirs, load_run
from cp3er.stats import bootstrap_mean_ci

COLUMNS = ["task", "agent", "obs", "seed", "frames", "final_return", "best_return",
           "wall_seconds", "bound_frac_end", "spread_end", "run_dir", "command"]
#: The collapse metrics of ``<prefix>_collapse.png`` (agents/policy_stats.py).
COLLAPSE_METRICS = ("action_bound_frac", "action_spread")
#: ``bound_frac_end`` / ``spread_end``: train rows of this last share of a run's frames.
END_SHARE = 0.1
# Overrides that say how a run was launched, not what it computes.
LAUNCH_ONLY = ("resume", "log.progress")


def run_command(path: Path) -> str:
    """``cp3er-train <overrides>`` of the run, from Hydra's saved ``overrides.yaml``."""
    from omegaconf import OmegaConf

    overrides_path = path / ".hydra" / "overrides.yaml"
    if not overrides_path.is_file():
        return ""
    overrides = [str(o) for o in OmegaConf.load(overrides_path)
                 if str(o).split("=", 1)[0] not in LAUNCH_ONLY]
    return " ".join(["cp3er-train", *overrides])


def run_dirs(grid_dir: Path) -> list[Path]:
    """Every run folder under ``grid_dir`` (sorted), skipping Hydra's own folders."""
    return find_run_dirs(grid_dir)


def run_row(path: Path) -> dict:
    run = load_run(path)
    evals = eval_rows(run)
    if not evals:
        raise PlotError(f"{path} has no evaluation rows yet")
    returns = [float(r["episode_return"]) for r in evals]
    frames = int(evals[-1]["frame"])
    end = {name: collapse_end(run, name, frames) for name in COLLAPSE_METRICS}
    return {"task": run.task, "agent": run.agent, "obs": run.obs, "seed": run.seed,
            "frames": frames, "final_return": returns[-1],
            "best_return": max(returns), "wall_seconds": float(evals[-1].get("seconds") or "nan"),
            "bound_frac_end": end["action_bound_frac"], "spread_end": end["action_spread"],
            "run_dir": os.path.relpath(path), "command": run_command(path)}


def collapse_series(run, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, values)`` of metric ``name`` over ``run``'s train rows that logged it."""
    points = [(float(r["frame"]), float(r[name])) for r in run.rows
              if r["phase"] == "train" and r.get(name)]
    if not points:
        return np.empty(0), np.empty(0)
    frames, values = np.array(points).T
    return frames, values


def collapse_end(run, name: str, frames: int) -> float | str:
    """Mean of ``name`` over the train rows of the last :data:`END_SHARE` of ``frames``
    ("" when there are none)."""
    at, values = collapse_series(run, name)
    last = values[(at > frames * (1 - END_SHARE)) & (at <= frames)]
    return round(float(last.mean()), 4) if last.size else ""


def plot_collapse(paths: list[Path], out: Path) -> None:
    """``<prefix>_collapse.png`` (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(path) for path in paths]
    tasks = sorted({run.task for run in runs})
    agents = sorted({run.agent for run in runs})
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(agents)}
    columns = min(len(agents), 4)
    legend_rows = -(-len(agents) // columns)
    fig, axes = plt.subplots(len(COLLAPSE_METRICS), len(tasks), squeeze=False,
                             figsize=(max(3.6 * len(tasks), 7.5), 5.0 + 0.25 * legend_rows),
                             sharex=True)
    for col, task in enumerate(tasks):
        for row, name in enumerate(COLLAPSE_METRICS):
            ax = axes[row, col]
            for run in (r for r in runs if r.task == task):
                frames, values = collapse_series(run, name)
                ax.plot(frames, values, color=colours[run.agent], lw=0.9, alpha=0.8)
            ax.set_title(task if row == 0 else "", fontsize=9)
            ax.set_ylabel(name if col == 0 else "", fontsize=8)
            ax.set_xlabel("frames" if row == len(COLLAPSE_METRICS) - 1 else "", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], color=colours[a], label=a) for a in agents]
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8)
    fig.tight_layout(rect=(0, 0.045 * legend_rows + 0.01, 1, 1))
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table(rows: list[dict], reps: int = 2000, seed: int = 0) -> str:
    """Markdown: mean final return +- 95% bootstrap CI per (task, agent)."""
    rng = np.random.default_rng(seed)
    lines = ["| task | agent | final return, mean [95% CI] | seeds | frames | wall time (s) |",
             "|---|---|---|---|---|---|"]
    keys = sorted({(r["task"], r["agent"]) for r in rows})
    for task, agent in keys:
        group = [r for r in rows if r["task"] == task and r["agent"] == agent]
        values = np.array([[r["final_return"]] for r in group])
        low, high = bootstrap_mean_ci(values, reps, rng)
        frames = sorted({r["frames"] for r in group})
        lines.append(
            f"| {task} | {agent} | {values.mean():.0f} [{low[0]:.0f}, {high[0]:.0f}] | "
            f"{len(group)} | {'/'.join(str(f) for f in frames)} | "
            f"{np.mean([r['wall_seconds'] for r in group]):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output prefix (no suffix)")
    parser.add_argument("--min-frames", type=int, default=0,
                        help="leave runs that stopped before this frame out of the table, "
                             "plot and aggregates (they stay in the CSV)")
    parser.add_argument("--seeds", type=lambda text: {int(s) for s in text.split(",")},
                        default=None, help="e.g. 1,2: compare only these seeds (a balanced "
                        "grid while a later seed is incomplete); the rest stay in the CSV")
    parser.add_argument("--agents", type=lambda text: set(text.split(",")), default=None,
                        help="e.g. cp3er,drqv2: compare only these agents (labels), as the "
                        "main grid beside extra variants of one seed; the rest stay in the CSV")
    args = parser.parse_args(argv)
    try:
        paths, rows = [], []
        for path in run_dirs(args.grid_dir):
            try:
                rows.append(run_row(path))
                paths.append(path)
            except PlotError as error:  # a run still before its first evaluation
                print(f"collect: skipped: {error}", file=sys.stderr)
        if not paths:
            raise PlotError(f"no run under {args.grid_dir} has an evaluation yet")
        compared = []  # (path, row) of the runs that reached --min-frames
        for path, row in zip(paths, rows, strict=True):
            if args.seeds is not None and row["seed"] not in args.seeds:
                why = f"(seed {row['seed']} not in --seeds)"
            elif args.agents is not None and row["agent"] not in args.agents:
                why = f"(agent {row['agent']} not in --agents)"
            elif row["frames"] < args.min_frames:
                why = f"stopped at frame {row['frames']} (< --min-frames {args.min_frames})"
            else:
                compared.append((path, row))
                continue
            print(f"collect: left out of the table, plot and aggregates: {path} {why}",
                  file=sys.stderr)
        if not compared:
            raise PlotError(f"no run under {args.grid_dir} reached frame {args.min_frames}")
        report = summarize([path for path, _ in compared], args.out.with_suffix(".png"))
        plot_collapse([path for path, _ in compared], Path(f"{args.out}_collapse.png"))
    except PlotError as error:
        print(f"collect: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv.tmp"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(args.out.with_suffix(".csv.tmp"), args.out.with_suffix(".csv"))
    compared_rows = [row for _, row in compared]
    write_atomic(Path(f"{args.out}_table.md"), table(compared_rows))
    aggregate = {k: v for k, v in report.items() if k != "curves"}
    write_atomic(Path(f"{args.out}_aggregate.json"),
                 json.dumps(aggregate, indent=2, default=lambda v: None if
                            (isinstance(v, float) and math.isnan(v)) else v))
    print(table(compared_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
