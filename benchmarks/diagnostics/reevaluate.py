"""Re-evaluate runs' latest checkpoints on common episodes: ``python
benchmarks/diagnostics/reevaluate.py <run_dir>... --out FILE.jsonl [--episodes 20] [--seed 12345]``.

A logged final return is the mean of a few episodes (5 in the CPU pixel profile); on a task
with bimodal returns (reacher_easy) it moves by hundreds between evaluations
(docs/results/README.md, "The final checkpoints re-evaluated"). Here every checkpoint plays
the same ``--episodes`` episodes (one ``--seed``: episode i starts from the same state
whatever the policy, tests/test_envs.py). One JSON line per run is appended to ``--out``
(rewritten atomically; runs already there with these episodes and seed are skipped, so a
stopped invocation resumes). Then it prints, per agent label, the aggregates
(:func:`cp3er.stats.aggregate_metrics` of return / 1000) of the re-evaluated means beside
those of the same runs' logged finals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cp3er.builders import restore_agent_for_eval
from cp3er.checkpoint import CheckpointError, atomic_write, load_checkpoint
from cp3er.evaluate import run_episodes, summarize
from cp3er.run_data import PlotError, eval_rows, load_run
from cp3er.stats import aggregate_metrics


def reevaluate(run_dir: Path, episodes: int, seed: int) -> dict:
    """``cp3er-eval``'s summary of the run's latest checkpoint over ``episodes`` episodes
    with evaluation seed ``seed``, with the run's identity and its logged final return."""
    run = load_run(run_dir)
    evals = eval_rows(run)
    state = load_checkpoint(run_dir)  # once: weights and counters agree
    cfg, env, agent = restore_agent_for_eval(state, seed=seed)
    torch.manual_seed(seed)
    start = time.monotonic()
    try:
        results = run_episodes(env, agent.policy, episodes)
    finally:
        env.close()
    return {"run": run_dir.name, "run_dir": os.path.relpath(run_dir), "task": run.task,
            "agent": run.agent, "seed": run.seed,
            "frame": int(state["counters"]["step"]) * int(cfg.env.action_repeat),
            "logged_final_return": float(evals[-1]["episode_return"]) if evals else None,
            "logged_final_frame": int(evals[-1]["frame"]) if evals else None, "eval_seed": seed,
            "wall_seconds": round(time.monotonic() - start, 1),
            **summarize(run.task, results, seed=seed)}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    atomic_write(path, lambda f: f.write(text))


def aggregates(rows: list[dict]) -> dict:
    """Per agent label: aggregates of the re-evaluated means and of the logged finals
    (return / 1000; None where no run has logged one), with the runs per task they pool."""
    by_agent: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_agent[row["agent"]].append(row)
    out = {}
    for agent, group in sorted(by_agent.items()):
        reevaluated, logged = defaultdict(list), defaultdict(list)
        for row in group:
            reevaluated[row["task"]].append(row["return_mean"] / 1000)
            if row["logged_final_return"] is not None:
                logged[row["task"]].append(row["logged_final_return"] / 1000)
        out[agent] = {
            "runs_per_task": {task: len(v) for task, v in sorted(reevaluated.items())},
            "reevaluated": aggregate_metrics({t: np.array(v) for t, v in reevaluated.items()}),
            "logged_final": (aggregate_metrics({t: np.array(v) for t, v in logged.items()})
                             if logged else None),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, required=True,
                        help="JSON-lines file: one line per run, appended (resumable)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=12345,
                        help="evaluation seed, the same for every run (common episodes)")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    torch.set_num_threads(1)
    rows = read_rows(args.out)
    done = {(row["run_dir"], row["episodes"], row["eval_seed"]) for row in rows}
    for run_dir in args.run_dirs:
        if (os.path.relpath(run_dir), args.episodes, args.seed) in done:
            continue
        try:
            rows.append(reevaluate(run_dir, args.episodes, args.seed))
        except (CheckpointError, PlotError) as error:
            print(f"reevaluate: {run_dir}: {error}", file=sys.stderr)
            return 2
        write_rows(args.out, rows)
    same_protocol = [row for row in rows
                     if row["episodes"] == args.episodes and row["eval_seed"] == args.seed]
    print(json.dumps(aggregates(same_protocol), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
