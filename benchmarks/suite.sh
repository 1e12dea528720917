#!/usr/bin/env bash
# A resumable suite of runs with one CPU profile (configs/profile/): a job list walked by
# lanes side by side (one run per core). PROFILE=cpu_pixels (default; 60k pixel frames,
# batch 32, about 70 minutes a run) or PROFILE=cpu_states (100k state frames, batch 256,
# 15-25 minutes a run). Every run resumes from its checkpoint when its
# folder has one (resume=true), so the suite can be stopped at any moment and started
# again, across sessions, with the same command; a finished run is only re-checkpointed.
#
#   bash benchmarks/cpu_pixel_suite.sh                     # the pixel grid (a wrapper)
#   JOBS=benchmarks/cpu_pixel_ablations.txt bash benchmarks/cpu_pixel_suite.sh
#   python benchmarks/collect.py runs/cpu_pixels --out docs/results/cpu_pixels --min-frames 60000
#   make state-suite                                       # = the two lines below
#   PROFILE=cpu_states OUT=runs/state_suite JOBS=benchmarks/state_suite.txt bash benchmarks/suite.sh
#   python benchmarks/collect.py runs/state_suite --out docs/results/state_suite --min-frames 100000 \
#     --agents cp3er,cp3er-stable,drqv2
#
# A job is one line "task agent seed [label [override ...]]"; the run folder is
# $OUT/<task>_<label>_s<seed> (label defaults to the agent) and the label names the run in
# plots and tables. Each of the LANES lanes walks the job list in order and takes the
# first job that is neither finished (its learning_curve.png, written when a run
# completes) nor held by another lane (an flock on $OUT/.locks/<run>.lock, released when
# its holder exits or dies): more lanes can be started at any time with another
# invocation, and lanes of a stopped suite never block a later one. A lane reads the job
# list again before each pick, so lines can be added or reordered while the suite runs.
# A run stopped by SIGTERM/SIGINT (checkpoint written, see README) stops its lane too: send
# the signal to the cp3er-train processes to stop a suite; the next invocation resumes them.
# A run folder held by another process (exit 75) is skipped. ARCHIVE=<folder> (optional)
# also skips every job whose run was archived there as <folder>/<run>/metrics.csv (the
# finished runs kept in docs/results/*_runs), so a suite resumes on a fresh machine whose
# runs/ is empty, e.g. ARCHIVE=docs/results/state_suite_runs for state_suite.txt.
set -euo pipefail
if ! command -v cp3er-train > /dev/null; then
  echo "suite: cp3er-train is not on PATH (activate .venv)" >&2
  exit 2
fi
PROFILE=${PROFILE:-cpu_pixels}
if [ ! -f "configs/profile/$PROFILE.yaml" ]; then
  echo "suite: unknown PROFILE=$PROFILE; valid: $(cd configs/profile && ls ./*.yaml | sed 's|./||; s|.yaml||' | tr '\n' ' ')" >&2
  exit 2
fi
OUT=${OUT:-runs/cpu_pixels/main}
JOBS=${JOBS:-benchmarks/cpu_pixel_main.txt}
LANES=${LANES:-2}
ARCHIVE=${ARCHIVE:-}
if [ -n "$ARCHIVE" ] && [ ! -d "$ARCHIVE" ]; then
  echo "suite: ARCHIVE=$ARCHIVE is not a folder (leave it unset to run every job)" >&2
  exit 2
fi
mkdir -p "$OUT/.locks"

run_job() {  # run_job task agent seed [label [override ...]]: 0 ran, 1 skipped, 2 stopped
  local task=$1 agent=$2 seed=$3 label=${4:-$2}
  local overrides=("${@:5}") name="${task}_${label}_s${seed}"
  local run_dir="$OUT/$name"
  [ -f "$run_dir/learning_curve.png" ] && return 1
  [ -n "$ARCHIVE" ] && [ -f "$ARCHIVE/$name/metrics.csv" ] && return 1  # finished elsewhere
  [ -f "$OUT/.locks/$name.failed" ] && return 1  # a run that cannot start: see its log
  exec {lock}> "$OUT/.locks/$name.lock"
  if ! flock -n "$lock"; then exec {lock}>&-; return 1; fi
  local resume=false
  [ -f "$run_dir/checkpoints/latest.pt" ] && resume=true
  echo "$(date -u +%FT%TZ) start $run_dir (resume=$resume)"
  local code=0
  cp3er-train "+profile=$PROFILE" "task=$task" "agent=$agent" "seed=$seed" "label=$label" \
    "run_dir=$run_dir" "resume=$resume" log.progress=false "${overrides[@]}" \
    >> "$run_dir.log" 2>&1 || code=$?
  if [ "$code" -eq 75 ]; then  # another process holds the run folder
    exec {lock}>&-; echo "$(date -u +%FT%TZ) skipped $run_dir (in use)"; return 1
  fi
  [ "$code" -eq 0 ] || {
    echo "$(date -u +%FT%TZ) FAILED ($code) $run_dir (see $run_dir.log)"
    # 1/2: refused config or stopped on a numerical error; a kill (130, 137, 143) is not
    # marked, so the next invocation resumes the run
    if [ "$code" -le 2 ]; then touch "$OUT/.locks/$name.failed"; fi
  }
  exec {lock}>&-
  if [ ! -f "$run_dir/learning_curve.png" ] && [ ! -f "$OUT/.locks/$name.failed" ]; then
    echo "$(date -u +%FT%TZ) stopped $run_dir (preempted: checkpoint written); lane stops"
    return 2
  fi
  echo "$(date -u +%FT%TZ) end $run_dir"
  return 0
}

lane() {  # a lane: run the first available job, until none is left
  local line code lines
  while true; do
    local ran=false
    mapfile -t lines < <(grep -v '^\s*\(#\|$\)' "$JOBS")  # read again: edits apply at the next pick
    for line in "${lines[@]}"; do
      read -r -a job <<< "$line"
      code=0
      run_job "${job[@]}" || code=$?
      [ "$code" -eq 2 ] && return 0  # its run was stopped by a signal: so is the lane
      if [ "$code" -eq 0 ]; then ran=true; break; fi
    done
    $ran || return 0
  done
}

export OMP_NUM_THREADS=1
for ((k = 0; k < LANES; k++)); do
  lane >> "$OUT/lane.log" 2>&1 &
  sleep 1
done
wait
