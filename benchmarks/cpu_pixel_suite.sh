#!/usr/bin/env bash
# CPU pixel suite: CP3ER vs DrQ-v2 from pixels with the CPU pixel profile
# (configs/profile/cpu_pixels.yaml: 60k frames, batch 32, threads 1; about 70 minutes a run),
# two lanes side by side (one run per core). Every run resumes from its checkpoint when its
# folder has one (resume=true), so the suite can be stopped at any moment and started
# again, across sessions, with the same command; a finished run is only re-checkpointed.
#
#   bash benchmarks/cpu_pixel_suite.sh                     # the main grid (below)
#   JOBS=benchmarks/cpu_pixel_ablations.txt bash benchmarks/cpu_pixel_suite.sh
#   python benchmarks/collect.py runs/cpu_pixels/main --out docs/results/cpu_pixels
#
# A job is one line "task agent seed [label [override ...]]"; the run folder is
# $OUT/<task>_<label>_s<seed> (label defaults to the agent) and the label names the run in
# plots and tables. Lines are dealt to the two lanes alternately, in file order.
set -euo pipefail
if ! command -v cp3er-train > /dev/null; then
  echo "cpu_pixel_suite: cp3er-train is not on PATH (activate .venv)" >&2
  exit 2
fi
OUT=${OUT:-runs/cpu_pixels/main}
JOBS=${JOBS:-benchmarks/cpu_pixel_main.txt}
LANES=${LANES:-2}
mkdir -p "$OUT"
mapfile -t LINES < <(grep -v '^\s*\(#\|$\)' "$JOBS")

run_job() {  # run_job task agent seed [label [override ...]]
  local task=$1 agent=$2 seed=$3 label=${4:-$2}
  local overrides=("${@:5}") run_dir="$OUT/${task}_${label}_s${seed}"
  local resume=false
  [ -f "$run_dir/checkpoints/latest.pt" ] && resume=true
  echo "$(date -u +%FT%TZ) start $run_dir (resume=$resume)"
  cp3er-train +profile=cpu_pixels "task=$task" "agent=$agent" "seed=$seed" "label=$label" \
    "run_dir=$run_dir" "resume=$resume" log.progress=false "${overrides[@]}" \
    > "$run_dir.log" 2>&1 || echo "$(date -u +%FT%TZ) FAILED $run_dir (see $run_dir.log)"
  echo "$(date -u +%FT%TZ) end $run_dir"
}

lane() {  # lane <index>: every LANES-th job line from <index>
  local i
  for ((i = $1; i < ${#LINES[@]}; i += LANES)); do
    read -r -a job <<< "${LINES[$i]}"
    run_job "${job[@]}"
  done
}

export OMP_NUM_THREADS=1
for ((k = 0; k < LANES; k++)); do
  lane "$k" >> "$OUT/lane$k.log" 2>&1 &
done
wait
