#!/usr/bin/env bash
# Every GPU check of issue 14 in one command (docs/gpu_check.md): installs the carried wheels (.whl/), runs the
# gpu-marked tests, the kernel benchmarks and short training runs, each stage under its own time limit, all
# within --budget seconds (default 450: under 8 minutes on an H200). Writes OUT_DIR/summary.json,
# OUT_DIR/summary.md and OUT_DIR/logs.tar.gz, and prints summary.md last.
#
#   bash scripts/gpu_check.sh OUT_DIR                  # on the GPU machine
#   bash scripts/gpu_check.sh OUT_DIR --cpu-dry-run    # the same stages at toy sizes on CPU (what CI runs)
#   bash scripts/gpu_check.sh OUT_DIR --only bench_kernels,train_fm_125m   # a second run of some stages
#   bash scripts/gpu_check.sh OUT_DIR --list           # the stages and their commands
#
# Python: $PYTHON, else python3 (on the GPU machine the image's python3, which holds torch; here the venv's).
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-python3}" "$repo/scripts/gpu_check/check.py" "$@"
