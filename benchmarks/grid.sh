#!/usr/bin/env bash
# A task x seed x agent grid at the paper's settings (pixels, full budgets) as Hydra
# multiruns, one per agent, then the CSV / table / PNG of benchmarks/collect.py.
#
#   TASKS=dog_run,humanoid_walk SEEDS=1,2,3 AGENTS="cp3er drqv2" OUT=runs/hard \
#     bash benchmarks/grid.sh [extra Hydra overrides...]
#
# Sequential on one machine (Hydra's basic launcher); on a cluster add a launcher plugin
# override, e.g. hydra/launcher=submitit_slurm (hydra-submitit-launcher, not a dependency).
# Runs resume where they stopped when launched again with resume=true.
set -euo pipefail
if ! command -v cp3er-train > /dev/null; then
  echo "grid: cp3er-train is not on PATH (activate .venv)" >&2
  exit 2
fi
: "${TASKS:?set TASKS, e.g. TASKS=cheetah_run,walker_walk}"
OUT=${OUT:-runs/grid}
SEEDS=${SEEDS:-1,2,3}
AGENTS=${AGENTS:-cp3er drqv2}
mkdir -p "$OUT"
for agent in $AGENTS; do
  cp3er-train -m "task=$TASKS" "seed=$SEEDS" "agent=$agent" obs=pixels \
    "run_dir=$OUT/\${task_name}_\${agent.name}_seed\${seed}" \
    "hydra.sweep.dir=$OUT/.multirun/$agent" "$@"
done
python benchmarks/collect.py "$OUT" --out "$OUT/$(basename "$OUT")"
