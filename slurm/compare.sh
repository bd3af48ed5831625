#!/usr/bin/env bash
# The comparison report of several runs (python -m fm_pretrain.compare) as a CPU job, e.g. after a study's jobs:
#   sbatch --dependency=afterany:<job ids> slurm/compare.sh --store http://mlflow-host:5000 --experiment NAME
# Arguments go to `python -m fm_pretrain.compare` (see docs/compare.md); no GPU needed.
#SBATCH --job-name=fm-compare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=1:00:00
#SBATCH --output=runs/slurm-%j.out
#SBATCH --open-mode=append
set -euo pipefail

root=${FM_PRETRAIN_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $root/slurm/common.sh ]] || root=${SLURM_SUBMIT_DIR:-.}
[[ -f $root/slurm/common.sh ]] || { echo "error: submit from the fm-pretrain repo root or set FM_PRETRAIN_ROOT" >&2; exit 2; }
source "$root/slurm/common.sh"

fm_slurm_compare "$@"
