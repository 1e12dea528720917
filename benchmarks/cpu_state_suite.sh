#!/usr/bin/env bash
# CPU-sized suite: CP3ER vs DrQ-v2 from states on 4 DMC tasks x 3 seeds (Hydra multirun),
# then the CSV / table / PNG of benchmarks/collect.py. Two lanes run side by side, one per
# core, each a Hydra multirun per agent (threads=1 per run).
#
#   make suite                                       # 20k frames, seeds 1,2,3
#   FRAMES=50000 SEEDS=1,2,3,4,5 OUT=runs/suite50k make suite
#
# CPU sizing, the same for both agents (documented in docs/results/README.md): MLPs of 256
# units, lr 1e-3, 2k random-action and seed frames, evaluation every 5k frames (5 episodes).
# CP3ER: MoG init_scale 0.1. DrQ-v2: noise decays over the first half of the run.
set -euo pipefail
if ! command -v cp3er-train > /dev/null; then
  echo "cpu_state_suite: cp3er-train is not on PATH (run 'make suite', or activate .venv)" >&2
  exit 2
fi
OUT=${OUT:-runs/cpu_state_suite}
FRAMES=${FRAMES:-20000}
SEEDS=${SEEDS:-1,2,3}
LANE1=${LANE1:-cartpole_swingup,walker_walk}
LANE2=${LANE2:-reacher_easy,cheetah_run}
mkdir -p "$OUT"
COMMON=(obs=state "frames=$FRAMES" hidden_dim=256 lr=1e-3
        schedule.seed_frames=2000 schedule.explore_frames=2000
        schedule.eval_every_frames=5000 schedule.eval_episodes=5
        threads=1 log.progress=false log.video=false checkpoint_every=0
        "run_dir=$OUT/\${task_name}_\${agent.name}_seed\${seed}")
lane() {  # lane <tasks> <name>
  cp3er-train -m "task=$1" "seed=$SEEDS" agent=cp3er agent.init_scale=0.1 "${COMMON[@]}" \
    "hydra.sweep.dir=$OUT/.multirun/$2_cp3er"
  cp3er-train -m "task=$1" "seed=$SEEDS" agent=drqv2 "agent.stddev_steps=$((FRAMES / 4))" \
    "${COMMON[@]}" "hydra.sweep.dir=$OUT/.multirun/$2_drqv2"
}
export OMP_NUM_THREADS=1
lane "$LANE1" lane1 > "$OUT/lane1.log" 2>&1 &
lane "$LANE2" lane2 > "$OUT/lane2.log" 2>&1 &
wait
python benchmarks/collect.py "$OUT" --out "$OUT/cpu_state_suite"
