#!/usr/bin/env bash
# GPU figures of docs/performance.md, on one CUDA GPU:
#   1. cp3er-bench --device cuda --compile: update / act ms eager, with torch.compile and
#      with CUDA graphs (compile mode reduce-overhead), train fps over 200 updates;
#   2. a short pixel cheetah_run training run on the GPU (collect, update, evaluate,
#      checkpoint) and cp3er-eval of its checkpoint: the whole loop with device=cuda.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (PYTHON=..., TRAIN_DIR=... optional)
set -euo pipefail
OUT_DIR=${1:-runs/bench_gpu}
PYTHON=${PYTHON:-python}
TRAIN_DIR=${TRAIN_DIR:-$OUT_DIR/train_cuda}  # its checkpoints are ~0.6 GB
mkdir -p "$OUT_DIR"
export MUJOCO_GL=${MUJOCO_GL:-egl}

"$PYTHON" -m cp3er.bench --device cuda --json --compile --fps-updates 200 \
  --env-tasks cheetah_run --checkpoint-transitions 0 > "$OUT_DIR/bench_gpu.json"

"$PYTHON" -m cp3er.train task=cheetah_run obs=pixels device=cuda frames=3000 \
  schedule.seed_frames=1000 schedule.explore_frames=1000 schedule.eval_every_frames=1500 \
  schedule.eval_episodes=1 checkpoint_every=1500 log.progress=false log.video=false \
  "run_dir=$TRAIN_DIR"
cp "$TRAIN_DIR/metrics.csv" "$OUT_DIR/train_cuda_metrics.csv"
"$PYTHON" -m cp3er.evaluate "$TRAIN_DIR" --episodes 1 > "$OUT_DIR/eval_cuda.json"
