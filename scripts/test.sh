#!/usr/bin/env bash
# Install everything (first run: about a minute), lint, and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# In CI (root, Debian): a real single-node Slurm for tests/test_slurm.py; elsewhere that test skips and says how.
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then
  echo "[test] installing slurm-wlm and munge for the Slurm tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if [ "${CI:-}" = "true" ]; then  # CI checks the GPU check's wheel set for real (tests/e2e/test_gpu_check.py)
  echo "[test] downloading the GPU check's wheels (scripts/gpu_wheels.sh)"
  bash scripts/gpu_wheels.sh
fi
echo "[test] ruff"
ruff check .
ruff format --check .
echo "[test] pytest"
python -m pytest "$@"
