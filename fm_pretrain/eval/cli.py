"""`python -m fm_pretrain.eval --checkpoint RUN_DIR/checkpoints/step_N [--tasks en,jsquad] [--num-fewshot K] ...`

Rebuilds the model from the checkpoint's saved config at tensor_parallel = 1, loads its full weights (the
layout-free universal form, converted once when missing; a ZeRO-0 checkpoint's own module states), evaluates,
prints a table, writes `eval_results.json` into the step directory and logs `downstream/<task>/<metric>` at the
checkpoint's step to MLflow (docs/evaluation.md).

Under `torchrun --nproc-per-node N -m fm_pretrain.eval ...` the N ranks split the items (each scores whole batches
of the one-rank split, eval/dp.py; gloo on CPU, NCCL with one GPU per rank) and rank 0 prints, writes and logs:
the scores are identical to a one-process run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from fm_pretrain.checkpoint import load_model, resolve_step_dir
from fm_pretrain.config import ConfigError, ExperimentConfig
from fm_pretrain.data.tokenizer import Tokenizer

from .dp import Shard, data_parallel_shard
from .readers import EvalDataError
from .report import RESULTS_FILE, format_table, log_to_mlflow, write_results
from .runner import evaluate_model
from .tasks import DEFAULT_DATA_DIR, GROUPS, TASKS

log = logging.getLogger("fm_pretrain.eval")


def load_tokenizer(cfg: ExperimentConfig, meta: dict[str, Any], override: Path | None) -> Tokenizer:
    path = override or Path(cfg.data.tokenizer)
    if not str(path) or not path.is_file():
        raise FileNotFoundError(f"tokenizer not found at {path!s} (data.tokenizer of the run); pass --tokenizer PATH")
    tok = Tokenizer(path)
    saved = meta.get("tokenizer_sha256")
    if saved and saved != tok.sha256:
        raise ValueError(f"{path}: sha256 {tok.sha256[:12]}... differs from the checkpoint's tokenizer_sha256 "
                         f"{saved[:12]}...; it was trained on other token ids")  # fmt: skip
    return tok


def load_for_eval(checkpoint: Path, device: str, dtype: str, tokenizer: Path | None):
    """What every evaluation command starts from (this CLI, long_context, retrieval, generate): (step_dir, the
    model in eval mode on `device`, bf16 when `dtype` is "bf16", its config, meta.json, the checked tokenizer)."""
    step_dir = resolve_step_dir(checkpoint)
    model, cfg, meta = load_model(step_dir, device)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    return step_dir, model, cfg, meta, load_tokenizer(cfg, meta, tokenizer)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", type=Path, required=True, help="RUN_DIR/checkpoints/step_N (or a dir with latest)")
    p.add_argument("--tasks", default="all", help=f"comma list of tasks and groups {sorted(GROUPS)}; tasks: "
                   f"{', '.join(TASKS)}")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="a tree laid out like shared/data/eval "
                   "(default: the committed fixtures, data/eval)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: each generation task's own")
    p.add_argument("--seed", type=int, default=1234, help="few-shot example choice")
    p.add_argument("--acc-norm-unit", choices=["chars", "bytes"], default="chars")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the run's data.tokenizer")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--per-item", action="store_true", help="also write each item's scores into eval_results.json")
    return p.parse_args(argv)


def init_data_parallel(device: str) -> tuple[Shard, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo) and use this rank's GPU;
    returns this rank's shard and device. One process: everything, on `device`."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return data_parallel_shard(), device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shard, device = init_data_parallel(args.device)
    try:
        code = _evaluate(args, shard, device)
    finally:
        if shard.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return code


def _evaluate(args: argparse.Namespace, shard: Shard, device: str) -> int:
    try:
        step_dir, model, cfg, meta, tok = load_for_eval(args.checkpoint, device, args.dtype, args.tokenizer)
        results = evaluate_model(
            model, tok, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, data_dir=args.data_dir,
            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, acc_norm_unit=args.acc_norm_unit,
            max_new_tokens=args.max_new_tokens, progress=not args.no_progress, shard=shard, per_item=args.per_item,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError, ConfigError, EvalDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if shard.rank != 0:
        return 0
    if shard.world > 1:
        print(f"data parallel: {shard.world} ranks split the items")
    step = int(meta["step"])
    run_dir = step_dir.resolve().parent.parent  # RUN_DIR/checkpoints/step_N
    results = {"checkpoint": str(step_dir.resolve()), "step": step, "model_type": cfg.model.model_type,
               "dtype": args.dtype, **results}  # fmt: skip
    print(format_table(results))
    out = write_results(results, step_dir / RESULTS_FILE)
    print(f"results: {out}")
    if args.no_mlflow or not cfg.tracking.enabled:
        print("MLflow: not logged (" + ("--no-mlflow" if args.no_mlflow else "tracking.enabled is false") + ")")
        return 0
    tags = {"model_type": cfg.model.model_type, "size": cfg.tracking.size or "unknown", "run_dir": str(run_dir)}
    run_id = log_to_mlflow(results, run_dir, step, cfg.tracking, tags)
    print(f"MLflow: downstream/<task>/<metric> at step {step} in run {run_id}")
    return 0
