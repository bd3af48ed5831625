#!/usr/bin/env bash
# A study on Slurm: one training job per config, each followed by its downstream evaluation, then one comparison
# job over them all; every run in one MLflow experiment of one tracking store. Run it where sbatch works (it
# submits and returns; it is not itself an sbatch script):
#
#   MLFLOW_TRACKING_URI=http://mlflow-host:5000 bash slurm/study.sh [options] [CONFIG ...] [-- section.key=value ...]
#
# CONFIGs default to the paper's comparison: configs/fm_1b.yaml configs/transformer_1b.yaml configs/mamba2_1b.yaml.
# Overrides after `--` apply to every training. Options:
#   --experiment NAME        MLflow experiment of every run (default: study-<date>-<time>)
#   --runs-root DIR          run dirs are DIR/<config name>, the report DIR/compare (default: runs/<experiment>)
#   --tracking-uri URI       the shared tracking store (default: $MLFLOW_TRACKING_URI; one of them is required).
#                            Use an `mlflow server`: sqlite on a shared filesystem is unsafe with concurrent writers
#                            (docs/operations.md); a sqlite URI is accepted with a warning (one node, local disk).
#   --train-sbatch "OPTS"    extra sbatch options of the training jobs (e.g. "--nodes=4 --time=72:00:00")
#   --eval-sbatch "OPTS"     ... of the evaluation jobs (e.g. "--partition=cpu --gres=none")
#   --compare-sbatch "OPTS"  ... of the comparison job
#   --eval-args "ARGS"       arguments of `python -m fm_pretrain.eval` (default: "--tasks all")
#   --no-eval                no evaluation jobs
#   --dry-run                validate and print the sbatch commands without submitting
# Environment for the jobs (NPROC_PER_NODE, FM_PRETRAIN_PYTHON, ...) is passed on by sbatch (--export=ALL).
#
# Dependencies: eval after its training with afterok (and --kill-on-invalid-dep=yes, so a failed training cancels
# its eval instead of leaving it pending forever); the comparison after every training and eval with afterany, so it
# reports whatever finished (a failed run shows its status in the table). Prints one line per job:
#   study: train <name> <job id> <run dir> | study: eval <name> <job id> | study: compare <job id> <report dir>
set -euo pipefail

source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

experiment="" runs_root="" uri=${MLFLOW_TRACKING_URI:-} eval_args="--tasks all" do_eval=1 dry_run=0
train_opts=() eval_opts=() compare_opts=() configs=() overrides=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --experiment) experiment=${2:?--experiment needs a name}; shift 2 ;;
        --runs-root) runs_root=${2:?--runs-root needs a directory}; shift 2 ;;
        --tracking-uri) uri=${2:?--tracking-uri needs a URI}; shift 2 ;;
        --train-sbatch) read -ra train_opts <<<"${2-}"; shift 2 ;;
        --eval-sbatch) read -ra eval_opts <<<"${2-}"; shift 2 ;;
        --compare-sbatch) read -ra compare_opts <<<"${2-}"; shift 2 ;;
        --eval-args) eval_args=${2-}; shift 2 ;;
        --no-eval) do_eval=0; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; overrides=("$@"); break ;;
        -*) fm_die "unknown option $1 (see the header of slurm/study.sh)" ;;
        *) configs+=("$1"); shift ;;
    esac
done
[[ ${#configs[@]} -gt 0 ]] || configs=(configs/fm_1b.yaml configs/transformer_1b.yaml configs/mamba2_1b.yaml)
experiment=${experiment:-study-$(date +%Y%m%d-%H%M%S)}
runs_root=${runs_root:-runs/$experiment}
[[ -n $uri ]] || fm_die "no tracking store: set MLFLOW_TRACKING_URI or pass --tracking-uri (an mlflow server, e.g." \
    "http://mlflow-host:5000; see docs/operations.md)"
if [[ $uri == sqlite:* ]]; then
    echo "study: warning: $uri is a sqlite store; concurrent jobs writing to it on a network filesystem can corrupt" \
        "it: prefer an mlflow server (docs/operations.md)" >&2
fi
read -ra eval_argv <<<"$eval_args"

cd "$FM_PRETRAIN_ROOT" || exit 2
python=$(fm_python)
export MLFLOW_TRACKING_URI=$uri

# Validate every config with its overrides, then the store, before creating or submitting anything.
names=()
for config in "${configs[@]}"; do
    [[ -f $config ]] || fm_die "config file not found: $config (relative paths are from $FM_PRETRAIN_ROOT)"
    name=$(basename "$config" .yaml)
    for seen in "${names[@]}"; do
        [[ $seen != "$name" ]] || fm_die "two configs named $name: run dirs would clash (rename one)"
    done
    names+=("$name")
    fm_resolve_run "$python" "$config" "${overrides[@]}" "tracking.experiment=$experiment" \
        "train.run_dir=$runs_root/$name" >/dev/null || fm_die "$config: invalid config or overrides (see above)"
done
mkdir -p "$runs_root"
runs_root=$(cd "$runs_root" && pwd)
"$python" -m fm_pretrain.tracking init --run-dir "$runs_root" --tracking-uri "$uri" --experiment "$experiment" \
    >/dev/null || fm_die "cannot reach the tracking store $uri or create experiment $experiment there"

submit() { # sbatch --parsable "$@" (or print it for --dry-run); prints the job id
    if [[ $dry_run -eq 1 ]]; then
        local env_vars=()
        [[ -n ${CONFIG:-} ]] && env_vars+=("CONFIG=$CONFIG")
        [[ -n ${RUN_DIR:-} ]] && env_vars+=("RUN_DIR=$RUN_DIR")
        [[ -n ${CHECKPOINT:-} ]] && env_vars+=("CHECKPOINT=$CHECKPOINT")
        echo "dry-run: $(printf '%q ' "${env_vars[@]}" sbatch --parsable "$@")" >&2
        echo "DRYRUN$RANDOM"
    else
        local out
        out=$(sbatch --parsable "$@") || fm_die "sbatch failed: sbatch $*"
        echo "${out%%;*}"
    fi
}

all_jobs=()
for i in "${!configs[@]}"; do
    config=${configs[$i]} name=${names[$i]}
    run_dir=$runs_root/$name
    train=$(CONFIG=$config RUN_DIR=$run_dir submit --job-name="$experiment-$name" \
        --output="$runs_root/slurm-%j-$name.out" "${train_opts[@]}" "$FM_PRETRAIN_ROOT/slurm/pretrain_1b.sh" \
        "${overrides[@]}" "tracking.experiment=$experiment")
    echo "study: train $name $train $run_dir"
    all_jobs+=("$train")
    if [[ $do_eval -eq 1 ]]; then
        ev=$(CHECKPOINT=$run_dir submit --job-name="$experiment-$name-eval" --dependency="afterok:$train" \
            --kill-on-invalid-dep=yes --output="$runs_root/slurm-%j-$name-eval.out" "${eval_opts[@]}" \
            "$FM_PRETRAIN_ROOT/slurm/eval.sh" "${eval_argv[@]}")
        echo "study: eval $name $ev"
        all_jobs+=("$ev")
    fi
done
deps=$(IFS=:; echo "${all_jobs[*]}")
cmp=$(submit --job-name="$experiment-compare" --dependency="afterany:$deps" \
    --output="$runs_root/slurm-%j-compare.out" "${compare_opts[@]}" "$FM_PRETRAIN_ROOT/slurm/compare.sh" \
    --store "$uri" --experiment "$experiment" --out "$runs_root/compare" --title "study $experiment")
echo "study: compare $cmp $runs_root/compare"
