#!/usr/bin/env bash
# A task x seed x agent grid at the paper's settings (pixels, full budgets) as Hydra
# multiruns, one per agent, then the CSV / table / PNG of benchmarks/collect.py.
#
#   TASKS=dog_run,humanoid_walk SEEDS=1,2,3 AGENTS="cp3er drqv2" OUT=runs/hard \
#     [LAUNCHER=basic|local|slurm] bash benchmarks/grid.sh [extra Hydra overrides...]
#
# LAUNCHER picks Hydra's launcher: basic (default: one run after another on this machine),
# local (submitit's local executor: all runs at once here) or slurm (one Slurm job per run;
# configs/hydra/launcher/slurm.yaml, set its partition etc. as extra overrides such as
# hydra.launcher.partition=gpu; needs pip install -e '.[cluster]'). Runs use resume=auto:
# launching the grid again, or a cluster requeueing a job, continues each run from its
# checkpoint (docs/scale.md).
set -euo pipefail
if ! command -v cp3er-train > /dev/null; then
  echo "grid: cp3er-train is not on PATH (activate .venv)" >&2
  exit 2
fi
: "${TASKS:?set TASKS, e.g. TASKS=cheetah_run,walker_walk}"
OUT=${OUT:-runs/grid}
SEEDS=${SEEDS:-1,2,3}
AGENTS=${AGENTS:-cp3er drqv2}
LAUNCHER=${LAUNCHER:-basic}
mkdir -p "$OUT"
for agent in $AGENTS; do
  cp3er-train -m "task=$TASKS" "seed=$SEEDS" "agent=$agent" obs=pixels resume=auto \
    "hydra/launcher=$LAUNCHER" \
    "run_dir=$OUT/\${task_name}_\${agent.name}_seed\${seed}" \
    "hydra.sweep.dir=$OUT/.multirun/$agent" "$@"
done
python benchmarks/collect.py "$OUT" --out "$OUT/$(basename "$OUT")"
