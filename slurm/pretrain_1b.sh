#!/usr/bin/env bash
# 1B Factorization Memory pretraining on Slurm: one torchrun per node, one rank per GPU.
#   sbatch slurm/pretrain_1b.sh [section.key=value ...]              (from the repo root; see slurm/README.md)
#   sbatch --nodes=4 slurm/pretrain_1b.sh train.steps=20000
# Command-line sbatch options override the defaults below.
#SBATCH --job-name=fm-1b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=runs/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
set -euo pipefail

# sbatch runs a spooled copy of this file, so find the repo from the submit dir unless run in place.
root=${FM_PRETRAIN_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $root/slurm/common.sh ]] || root=${SLURM_SUBMIT_DIR:-.}
[[ -f $root/slurm/common.sh ]] || { echo "error: submit from the fm-pretrain repo root or set FM_PRETRAIN_ROOT" >&2; exit 2; }
source "$root/slurm/common.sh"

export CONFIG=${CONFIG:-configs/fm_1b.yaml}
fm_slurm_launch "$@"
