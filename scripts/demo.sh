#!/usr/bin/env bash
# Install everything (first run: about a minute) and run a small end-to-end pretraining run on the bundled
# EN+JA corpus: tokenizer, packing, 2 DeepSpeed ranks (CPU, or the local GPUs), MLflow. Args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m fm_pretrain.demo "$@"
