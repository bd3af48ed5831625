#!/usr/bin/env bash
# Install everything (first run: about a minute), lint, and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
echo "[test] ruff"
ruff check .
ruff format --check .
echo "[test] pytest"
python -m pytest "$@"
