#!/usr/bin/env bash
# CPU pixel suite: CP3ER vs DrQ-v2 from pixels with the CPU pixel profile
# (configs/profile/cpu_pixels.yaml: 60k frames, batch 32, threads 1; about 70 minutes a run),
# two lanes side by side: benchmarks/suite.sh with PROFILE=cpu_pixels (its header says how
# jobs, lanes, resumes and stops work).
#
#   bash benchmarks/cpu_pixel_suite.sh                     # the main grid
#   JOBS=benchmarks/cpu_pixel_ablations.txt OUT=runs/cpu_pixels/ablations bash benchmarks/cpu_pixel_suite.sh
PROFILE=cpu_pixels exec bash "$(dirname "$0")/suite.sh" "$@"
