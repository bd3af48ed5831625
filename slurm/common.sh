# shellcheck shell=bash
# Shared launcher logic for the sbatch scripts in slurm/ (sourced, not run). Usage in a script:
#   source "$FM_PRETRAIN_ROOT/slurm/common.sh"; fm_slurm_launch "$@"
# Environment (all optional):
#   CONFIG               experiment YAML, relative to the repo root or absolute (the calling script sets a default)
#   RUN_DIR              passed to training as the override train.run_dir=$RUN_DIR
#   NPROC_PER_NODE       ranks per node; default: the node's GPUs (Slurm's count, else CUDA_VISIBLE_DEVICES or
#                        nvidia-smi), else 2 CPU ranks with DS_ACCELERATOR=cpu
#   GPUS_PER_NODE        same as NPROC_PER_NODE (read when NPROC_PER_NODE is unset)
#   MASTER_PORT          rendezvous port on the first node; default: derived from the job id
#   FM_PRETRAIN_PYTHON   interpreter with fm-pretrain installed; default: the repo's .venv, else python3
# Arguments: section.key=value overrides for fm_pretrain/train.py.

fm_die() {
    echo "error: $*" >&2
    exit 2
}

# The repo root: where this file lives (sbatch copies the calling script to a spool dir, but not this file).
FM_PRETRAIN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

fm_python() {
    if [[ -n ${FM_PRETRAIN_PYTHON:-} ]]; then
        echo "$FM_PRETRAIN_PYTHON"
    elif [[ -x $FM_PRETRAIN_ROOT/.venv/bin/python ]]; then
        echo "$FM_PRETRAIN_ROOT/.venv/bin/python"
    else
        command -v python3 || fm_die "no python3 on PATH; set FM_PRETRAIN_PYTHON"
    fi
}

# GPUs this node gives the job: Slurm's count if it schedules GPUs, else what the node shows (clusters without GRES).
fm_gpus_on_node() {
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Prints the resolved train.run_dir, tracking URI and experiment (one per line), or nothing if tracking is off.
# Also validates the config and overrides here, before any node starts, so a typo fails in seconds.
fm_resolve_tracking() {
    "$1" - "${@:2}" <<'EOF'
import sys
from fm_pretrain.config import ConfigError, load_config
from fm_pretrain.tracking import resolve_tracking_uri

try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"error: {e}")
if cfg.tracking.enabled:
    print(cfg.train.run_dir, resolve_tracking_uri(cfg.tracking, cfg.train.run_dir), cfg.tracking.experiment, sep="\n")
EOF
}

fm_slurm_launch() {
    [[ -n ${SLURM_JOB_ID:-} ]] || fm_die "run this through sbatch (or inside an salloc allocation)"
    [[ -n ${CONFIG:-} ]] || fm_die "set CONFIG to an experiment YAML"
    cd "$FM_PRETRAIN_ROOT" || exit 2  # configs reference ds_configs/ and data paths relative to the repo root
    [[ -f $CONFIG ]] || fm_die "config file not found: $CONFIG (relative paths are from $FM_PRETRAIN_ROOT)"

    local python gpus nproc nnodes master_addr master_port
    python=$(fm_python)
    gpus=$(fm_gpus_on_node)
    nnodes=${SLURM_NNODES:-1}
    local overrides=("$@")
    [[ -n ${RUN_DIR:-} ]] && overrides+=("train.run_dir=$RUN_DIR")

    # One rank per GPU; without GPUs, 2 CPU ranks (gloo). DeepSpeed picks its accelerator at import, in every rank.
    if [[ $gpus -gt 0 ]]; then
        nproc=${NPROC_PER_NODE:-${GPUS_PER_NODE:-$gpus}}
    else
        nproc=${NPROC_PER_NODE:-${GPUS_PER_NODE:-2}}
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    fi
    export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}

    # torchrun's c10d rendezvous lives on the first node; the port is per job so jobs sharing a node don't clash.
    master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    master_port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

    # Create the MLflow store and experiment once, before the ranks start (concurrent sqlite creation fails).
    local tracking
    tracking=$(fm_resolve_tracking "$python" "$CONFIG" "${overrides[@]}") || exit 2
    if [[ -n $tracking ]]; then
        local run_dir uri experiment
        { read -r run_dir; read -r uri; read -r experiment; } <<<"$tracking"
        "$python" -m fm_pretrain.tracking init --run-dir "$run_dir" --tracking-uri "$uri" --experiment "$experiment" \
            >/dev/null
    fi

    echo "fm-pretrain: job $SLURM_JOB_ID on $nnodes node(s) [$SLURM_JOB_NODELIST] x $nproc rank(s), $gpus GPU(s)/node;" \
        "rendezvous $master_addr:$master_port; config $CONFIG; python $python${DS_ACCELERATOR:+; DS_ACCELERATOR=$DS_ACCELERATOR}"
    [[ ${#overrides[@]} -gt 0 ]] && printf 'fm-pretrain: override %s\n' "${overrides[@]}"

    # One torchrun per node; it starts the node's ranks. --kill-on-bad-exit ends all nodes if one fails.
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$python" -m torch.distributed.run \
        --nnodes="$nnodes" --nproc_per_node="$nproc" \
        --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$master_addr:$master_port" \
        "$FM_PRETRAIN_ROOT/fm_pretrain/train.py" --config "$CONFIG" "${overrides[@]}"
}
