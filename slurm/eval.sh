#!/usr/bin/env bash
# Downstream English/Japanese evaluation of a checkpoint (python -m fm_pretrain.eval), one process, one GPU or CPU.
#   CHECKPOINT=runs/fm_1b sbatch slurm/eval.sh [eval options ...]          (a run dir: its latest checkpoint)
#   job=$(sbatch --parsable slurm/pretrain_1b.sh)                           (chained after training:)
#   CHECKPOINT=runs/fm_1b sbatch --dependency=afterok:$job --kill-on-invalid-dep=yes slurm/eval.sh --tasks en,ja
#   CHECKPOINT=runs/fm_1b sbatch --partition=cpu --gres=none slurm/eval.sh  (a CPU partition: runs on CPU)
# Arguments go to `python -m fm_pretrain.eval` (--tasks, --limit, --num-fewshot, --batch-size, --data-dir, ...);
# --checkpoint comes from CHECKPOINT and --device is cpu when the job has no GPU, unless given. Scores are logged
# into the training run (RUN_DIR/mlflow_run_id) of the run's tracking store ($MLFLOW_TRACKING_URI when set).
# HARNESS=lm-eval runs lm-evaluation-harness on the checkpoint instead (`--model fm_pretrain`, tasks fm_all unless
# --tasks is given; arguments go to lm_eval); HARNESS=fm (the default) is our harness.
#SBATCH --job-name=fm-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=4:00:00
#SBATCH --output=runs/slurm-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# sbatch runs a spooled copy of this file, so find the repo from the submit dir unless run in place.
root=${FM_PRETRAIN_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $root/slurm/common.sh ]] || root=${SLURM_SUBMIT_DIR:-.}
[[ -f $root/slurm/common.sh ]] || { echo "error: submit from the fm-pretrain repo root or set FM_PRETRAIN_ROOT" >&2; exit 2; }
source "$root/slurm/common.sh"

fm_slurm_eval "$@"
