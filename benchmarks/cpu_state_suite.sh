#!/usr/bin/env bash
# CPU-sized suite: CP3ER vs DrQ-v2 from states on 4 DMC tasks x 3 seeds (Hydra multirun),
# then the CSV / table / PNG of benchmarks/collect.py. Two lanes run side by side, one per
# core, each a Hydra multirun per agent (threads=1 per run).
#
#   make suite                                       # 20k frames, seeds 1,2,3
#   FRAMES=50000 SEEDS=1,2,3,4,5 OUT=runs/suite50k make suite
#   VARIANTS="cp3er cp3er_distill" OUT=runs/cpu_state_distill bash benchmarks/cpu_state_suite.sh
#
# CPU sizing, the same for both agents (documented in docs/results/README.md): MLPs of 256
# units, lr 1e-3, 2k random-action and seed frames, evaluation every 5k frames (5 episodes).
# CP3ER: MoG init_scale 0.1. DrQ-v2: noise decays over the first half of the run.
# VARIANTS (default "cp3er drqv2") names the agents run in each lane, in order; also
# cp3er_distill: CP3ER with agent.consistency.loss=distillation (docs/implementation.md).
set -euo pipefail
if [ -z "${TRAIN:-}" ] && ! command -v cp3er-train > /dev/null; then
  echo "cpu_state_suite: cp3er-train is not on PATH (run 'make suite', or activate .venv)" >&2
  exit 2
fi
OUT=${OUT:-runs/cpu_state_suite}
FRAMES=${FRAMES:-20000}
SEEDS=${SEEDS:-1,2,3}
LANE1=${LANE1:-cartpole_swingup,walker_walk}
LANE2=${LANE2:-reacher_easy,cheetah_run}
VARIANTS=${VARIANTS:-cp3er drqv2}
TRAIN=${TRAIN:-cp3er-train}  # e.g. TRAIN="python -m cp3er.train_cli" for a source checkout
mkdir -p "$OUT"
COMMON=(obs=state "frames=$FRAMES" hidden_dim=256 lr=1e-3
        schedule.seed_frames=2000 schedule.explore_frames=2000
        schedule.eval_every_frames=5000 schedule.eval_episodes=5
        threads=1 log.progress=false log.video=false checkpoint_every=0)
variant() {  # variant <name>: the agent overrides of a variant
  case $1 in
    cp3er) echo agent=cp3er agent.init_scale=0.1 ;;
    cp3er_distill) echo agent=cp3er agent.init_scale=0.1 agent.consistency.loss=distillation \
                        label=cp3er_distill ;;
    drqv2) echo agent=drqv2 "agent.stddev_steps=$((FRAMES / 4))" ;;
    *) echo "cpu_state_suite: unknown variant $1 (cp3er, cp3er_distill, drqv2)" >&2; exit 2 ;;
  esac
}
for name in $VARIANTS; do variant "$name" > /dev/null; done
lane() {  # lane <tasks> <name>
  for name in $VARIANTS; do
    # shellcheck disable=SC2046  # the variant's overrides are words
    $TRAIN -m "task=$1" "seed=$SEEDS" $(variant "$name") "${COMMON[@]}" \
      "run_dir=$OUT/\${task_name}_${name}_seed\${seed}" "hydra.sweep.dir=$OUT/.multirun/$2_$name"
  done
}
export OMP_NUM_THREADS=1
lane "$LANE1" lane1 > "$OUT/lane1.log" 2>&1 &
lane "$LANE2" lane2 > "$OUT/lane2.log" 2>&1 &
wait
python benchmarks/collect.py "$OUT" --out "$OUT/cpu_state_suite"
