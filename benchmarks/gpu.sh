#!/usr/bin/env bash
# GPU figures of docs/performance.md, on one CUDA GPU, in one command (~8 minutes on an H200):
#   1. cp3er-bench --device cuda --compile: update / act ms eager, with torch.compile and
#      with CUDA graphs (compile mode reduce-overhead), the whole update captured as one
#      CUDA graph (perf.cuda_graph) per precision with its losses against eager updates,
#      train fps over 200 updates (and with perf.cuda_graph), and
#      train_fps_workers: collector.workers 1, 4, 8, sync and async, with updates per frame;
#      sample_ms with the replay storage on the GPU (replay.device);
#   2. perf.precision fp32 / tf32 / bf16: losses of the first updates and ms per update
#      (benchmarks/diagnostics/precision.py, pixels, the reference sizes);
#   3. a short pixel cheetah_run training run on the GPU with the replay on the GPU and the
#      update captured as a CUDA graph (collect, update, evaluate, checkpoint), resumed
#      once to 4,500 frames (the graph captured again), and cp3er-eval of its checkpoint;
#   4. the CUDA-only tests (replay on the device, CUDA graph), which CPU machines skip.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (PYTHON=..., TRAIN_DIR=... optional)
set -euo pipefail
OUT_DIR=${1:-runs/bench_gpu}
PYTHON=${PYTHON:-python}
TRAIN_DIR=${TRAIN_DIR:-$OUT_DIR/train_cuda}  # its checkpoints are ~0.6 GB
mkdir -p "$OUT_DIR"
export MUJOCO_GL=${MUJOCO_GL:-egl}

"$PYTHON" -m cp3er.bench --device cuda --json --compile --fps-updates 200 \
  --env-tasks cheetah_run --checkpoint-transitions 0 > "$OUT_DIR/bench_gpu.json"

"$PYTHON" benchmarks/diagnostics/precision.py --device cuda --obs pixels --updates 20 \
  > "$OUT_DIR/precision_gpu.json"

TRAIN=(task=cheetah_run obs=pixels device=cuda replay.device=cuda perf.cuda_graph=true
  schedule.seed_frames=1000 schedule.explore_frames=1000 schedule.eval_every_frames=1500
  schedule.eval_episodes=1 checkpoint_every=1500 log.progress=false log.video=false
  "run_dir=$TRAIN_DIR")
"$PYTHON" -m cp3er.train_cli "${TRAIN[@]}" frames=3000
"$PYTHON" -m cp3er.train_cli "${TRAIN[@]}" frames=4500 resume=true
cp "$TRAIN_DIR/metrics.csv" "$OUT_DIR/train_cuda_metrics.csv"
"$PYTHON" -m cp3er.evaluate "$TRAIN_DIR" --episodes 1 > "$OUT_DIR/eval_cuda.json"

# CUDA-only tests (skipped on a CPU): the replay storage on the GPU against the CPU's, the
# CUDA graph's replays against eager updates
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_replay.py tests/test_cuda_graph.py -k cuda \
  > "$OUT_DIR/tests_cuda.txt" 2>&1 || echo "gpu.sh: CUDA tests failed: $OUT_DIR/tests_cuda.txt"
