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
#
# Stopping (preemption, time limit): SIGUSR1 or SIGTERM, delivered to the batch shell (`#SBATCH --signal=B:USR1@T`,
# `scancel --batch`/`--full`), to the job step (`--signal=USR1@T`, `scancel --signal=USR1`) or both, makes every
# training rank checkpoint at the next step boundary and exit 0. The batch shell forwards what it gets to the step
# (srun passes it to every process of the step); torchrun itself ignores both signals, so that it neither dies nor
# kills the ranks while they save, and exits 0 once they have. A run that stopped before train.steps is requeued
# (`scontrol requeue`) when the job is requeueable (`--requeue`), and then resumes from that checkpoint.

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

# Prints the resolved train.run_dir, train.steps, tracking URI and experiment, one per line (the last two empty when
# tracking is off). Also validates the config and overrides here, before any node starts, so a typo fails in seconds.
fm_resolve_run() {
    "$1" - "${@:2}" <<'EOF'
import sys
from fm_pretrain.config import ConfigError, load_config
from fm_pretrain.tracking import resolve_tracking_uri

try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"error: {e}")
uri = resolve_tracking_uri(cfg.tracking, cfg.train.run_dir) if cfg.tracking.enabled else ""
print(cfg.train.run_dir, cfg.train.steps, uri, cfg.tracking.experiment if uri else "", sep="\n")
EOF
}

# The step of run_dir's latest checkpoint, 0 if there is none.
fm_checkpoint_step() {
    local tag
    tag=$(cat "$1/checkpoints/latest" 2>/dev/null) || tag=step_0
    echo "${tag#step_}"
}

# Trap handler of the batch shell: ask the training step to checkpoint and stop. srun passes SIGUSR1 on to every
# process of the step (the ranks treat SIGUSR1 and SIGTERM alike; srun itself would end the step on SIGTERM).
fm_forward_stop() {
    echo "fm-pretrain: the batch shell got SIG$1: asking the training ranks to checkpoint and stop" >&2
    if [[ -n ${FM_SRUN_PID:-} ]]; then
        kill -USR1 "$FM_SRUN_PID" 2>/dev/null || true
    fi
}

# Runs "$@" (the srun command) in the background, so that the batch shell's traps run while it does (bash runs
# traps only between commands); returns its exit code.
fm_run_stoppable() {
    FM_SRUN_PID=""
    trap 'fm_forward_stop USR1' USR1
    trap 'fm_forward_stop TERM' TERM
    "$@" &
    FM_SRUN_PID=$!
    local rc
    while :; do
        wait "$FM_SRUN_PID" && rc=0 || rc=$?
        kill -0 "$FM_SRUN_PID" 2>/dev/null || break # still there: `wait` was cut short by a trapped signal
    done
    trap - USR1 TERM
    return "$rc"
}

# After training exited 0: if it stopped before train.steps (on a stop signal), requeue the job if it is requeueable.
fm_requeue_if_stopped() {
    local run_dir=$1 steps=$2 step
    step=$(fm_checkpoint_step "$run_dir")
    [[ $step -lt $steps ]] || return 0
    if [[ $(scontrol show job -o "$SLURM_JOB_ID") =~ (^|[[:space:]])Requeue=1([[:space:]]|$) ]]; then
        echo "fm-pretrain: stopped at step $step of $steps (checkpoint saved); requeueing job $SLURM_JOB_ID"
        trap '' TERM # the requeue terminates this shell, which has nothing left to do
        scontrol requeue "$SLURM_JOB_ID" || echo "fm-pretrain: scontrol requeue failed; resubmit to continue" >&2
    else
        echo "fm-pretrain: stopped at step $step of $steps (checkpoint saved); the job is not requeueable" \
            "(--no-requeue): resubmit to continue"
    fi
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
    # The signals torchrun handles, without SIGTERM (see the srun line below): PET_... is the environment form of
    # --signals-to-handle in torch 2.13, which overwrites TORCHELASTIC_...; older versions read the latter.
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

    # torchrun's c10d rendezvous lives on the first node; the port is per job so jobs sharing a node don't clash.
    master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    master_port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

    local info lines run_dir steps uri experiment
    info=$(fm_resolve_run "$python" "$CONFIG" "${overrides[@]}") || exit 2
    mapfile -t lines <<<"$info" # $(...) dropped the empty lines at the end: read would fail on them
    run_dir=${lines[0]} steps=${lines[1]} uri=${lines[2]:-} experiment=${lines[3]:-}
    # Create the MLflow store and experiment once, before the ranks start (concurrent sqlite creation fails).
    if [[ -n $uri ]]; then
        "$python" -m fm_pretrain.tracking init --run-dir "$run_dir" --tracking-uri "$uri" --experiment "$experiment" \
            >/dev/null
    fi

    echo "fm-pretrain: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nnodes node(s) [$SLURM_JOB_NODELIST]" \
        "x $nproc rank(s), $gpus GPU(s)/node; rendezvous $master_addr:$master_port; config $CONFIG; python $python${DS_ACCELERATOR:+; DS_ACCELERATOR=$DS_ACCELERATOR}"
    [[ ${#overrides[@]} -gt 0 ]] && printf 'fm-pretrain: override %s\n' "${overrides[@]}"

    # One torchrun per node; it starts the node's ranks. --kill-on-bad-exit ends all nodes if one fails.
    # torchrun ignores SIGUSR1 and SIGTERM (SIG_IGN set before exec; SIGTERM left out of the signals it handles):
    # by default SIGUSR1 would kill it, and on SIGTERM it kills the ranks 30 s later and exits non-zero. The ranks
    # get the signal from Slurm and set their own handlers (train.save_on_signal); Slurm's SIGKILL after its
    # KillWait still ends everything.
    local rc
    fm_run_stoppable \
        srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c 'trap "" USR1 TERM; exec "$@"' fm-torchrun \
        "$python" -m torch.distributed.run \
        --nnodes="$nnodes" --nproc_per_node="$nproc" \
        --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$master_addr:$master_port" \
        "$FM_PRETRAIN_ROOT/fm_pretrain/train.py" --config "$CONFIG" "${overrides[@]}" && rc=0 || rc=$?
    [[ $rc -eq 0 ]] || return "$rc"
    fm_requeue_if_stopped "$run_dir" "$steps"
}

# True if the arguments hold the option $1 (as "$1" or "$1=...").
fm_has_option() {
    local opt=$1 arg
    shift
    for arg in "$@"; do
        [[ $arg == "$opt" || $arg == "$opt="* ]] && return 0
    done
    return 1
}

# Downstream evaluation of one checkpoint in this job (slurm/eval.sh): python -m fm_pretrain.eval, one process.
# CHECKPOINT (a run dir, its checkpoints dir or a step_N dir; resolved when the job starts, so a job chained with
# --dependency=afterok on the training job evaluates the checkpoint training ended with) unless --checkpoint is
# given; --device cpu when the job has no GPU, else the CLI's default (cuda). Arguments go to the eval CLI.
fm_slurm_eval() {
    [[ -n ${SLURM_JOB_ID:-} ]] || fm_die "run this through sbatch (or inside an salloc allocation)"
    cd "$FM_PRETRAIN_ROOT" || exit 2
    local python args=("$@")
    python=$(fm_python)
    if ! fm_has_option --checkpoint "$@"; then
        [[ -n ${CHECKPOINT:-} ]] || fm_die "set CHECKPOINT to a run dir, checkpoints dir or step_N dir (or pass --checkpoint)"
        args=(--checkpoint "$CHECKPOINT" "${args[@]}")
    fi
    if ! fm_has_option --device "$@" && [[ $(fm_gpus_on_node) -eq 0 ]]; then
        args+=(--device cpu)
    fi
    export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
    if [[ ${HARNESS:-fm} == lm-eval ]]; then  # lm-evaluation-harness on the checkpoint (docs/export.md)
        local ckpt=${CHECKPOINT:-} largs=("$@")
        fm_has_option --model_args "$@" || largs=(--model fm_pretrain --model_args "checkpoint=$ckpt" "${largs[@]}")
        fm_has_option --tasks "$@" || largs+=(--tasks fm_all)
        if ! fm_has_option --device "$@" && [[ $(fm_gpus_on_node) -eq 0 ]]; then largs+=(--device cpu); fi
        echo "fm-pretrain: eval job $SLURM_JOB_ID (lm-evaluation-harness): $python -m fm_pretrain.eval.lm_eval_model ${largs[*]}"
        exec "$python" -m fm_pretrain.eval.lm_eval_model "${largs[@]}"
    fi
    [[ ${HARNESS:-fm} == fm ]] || fm_die "HARNESS must be fm (our harness, the default) or lm-eval, got '$HARNESS'"
    echo "fm-pretrain: eval job $SLURM_JOB_ID on $(hostname -s), $(fm_gpus_on_node) GPU(s): $python -m fm_pretrain.eval ${args[*]}"
    exec "$python" -m fm_pretrain.eval "${args[@]}"
}

# The comparison report in this job (slurm/compare.sh): python -m fm_pretrain.compare with the given arguments.
fm_slurm_compare() {
    [[ -n ${SLURM_JOB_ID:-} ]] || fm_die "run this through sbatch (or inside an salloc allocation)"
    cd "$FM_PRETRAIN_ROOT" || exit 2
    local python
    python=$(fm_python)
    export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
    echo "fm-pretrain: compare job $SLURM_JOB_ID on $(hostname -s): $python -m fm_pretrain.compare --no-progress $*"
    exec "$python" -m fm_pretrain.compare --no-progress "$@"
}
