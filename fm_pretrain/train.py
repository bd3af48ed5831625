"""Pretraining entry point: `deepspeed fm_pretrain/train.py --config configs/X.yaml [section.key=value ...]`.

Also `torchrun --nproc_per_node N fm_pretrain/train.py ...`, `python -m fm_pretrain.train ...` and the installed
`fm-train ...`; on a machine without CUDA it trains on CPU with gloo. Reads top to bottom: config -> preflight
(every check that needs the machine, before any process group) -> distributed -> data -> model and engine ->
resume -> tracking -> the loop (fm_pretrain/training/trainer.py) -> finish.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # The one place that handles running a file inside the package as a script: Python then puts fm_pretrain/
    # itself on sys.path, where data/, model/ and config.py would shadow unrelated top-level modules of those
    # names. Import the package by its name instead. (`python -m` and the installed scripts never get here.)
    sys.path.pop(0)

import argparse
import logging
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import yaml

from fm_pretrain.checkpoint import CheckpointLayout
from fm_pretrain.config import ConfigError, ExperimentConfig, load_config, to_dict
from fm_pretrain.data import DataError
from fm_pretrain.data.identity import data_identity
from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.data.training_data import build_train_valid
from fm_pretrain.parallel.state import data_parallel_group
from fm_pretrain.tracking import Tracker
from fm_pretrain.training.components import Checkpointer, DownstreamEval, RouterMonitor, Throughput, Validator
from fm_pretrain.training.guards import NONFINITE_EXIT_CODE, NonFiniteError
from fm_pretrain.training.preflight import launch_environment, preflight
from fm_pretrain.training.setup import build_engine, destroy, init_distributed, setup_logging
from fm_pretrain.training.trainer import Trainer

log = logging.getLogger("fm_pretrain.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg: ExperimentConfig = load_config(args.config, args.overrides)
    plan = preflight(cfg, *launch_environment())  # raises ConfigError naming the key; no process group yet
    layout = init_distributed(plan, cfg.train.collective_timeout_s)
    setup_logging(layout.rank)
    run_dir = Path(cfg.train.run_dir)

    # ---- data: one packed directory (data.path) or a blend (data.blend); tokenizer hashes must agree ----
    tokenizer = Tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    sha = tokenizer.sha256 if tokenizer else None
    data = build_train_valid(cfg.data, sha, cfg.train.micro_batch_size, plan.dp, cfg.train.val_batches, layout.dp_rank)
    cfg.model.vocab_size = data.vocab_size

    # ---- model, optimizer, schedule, DeepSpeed engine; then resume (at another layout it reshards) ----
    engine, info = build_engine(cfg, plan)
    meta = {"tokenizer_sha256": sha, "data": data_identity(data.train, data.sampler), "config": to_dict(cfg)}
    ckpt_layout = CheckpointLayout(dp=plan.dp, zero_stage=plan.zero_stage, tp=plan.tp)
    checkpointer = Checkpointer(cfg.train, ckpt_layout, meta, info.universal_info)
    state = checkpointer.resume(engine)

    # ---- tracking: rank 0 writes MLflow, metrics.jsonl and the log line (the tracker checks the rank) ----
    tracker = Tracker(
        cfg.tracking, run_dir, layout.rank, total_steps=cfg.train.steps, metrics_file=True, log_lines=True
    )
    if layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tags = {
        "model_type": cfg.model.model_type,
        "size": cfg.tracking.size,
        "layer_pattern": ",".join(cfg.model.layer_pattern),
        "zero_stage": str(plan.zero_stage),
        "world_size": str(plan.world),
        "device": info.device_name,
    }
    params = {"n_params": info.n_params, "flops_per_token": info.flops_per_token}
    tracker.start(to_dict(cfg), tags, params=params, resume=cfg.train.resume, resume_step=state.step or None)
    if state.step == 0 and cfg.data.tokenizer:
        tracker.log_artifact(cfg.data.tokenizer, "tokenizer")
    log.info(
        "model %s: %.2fM parameters, %d layers %s; %d ranks on %s; ZeRO-%d, %s; global batch %d x %d tokens",
        cfg.model.model_type, info.n_params / 1e6, cfg.model.n_layers, cfg.model.layer_pattern, plan.world,
        info.device_name, plan.zero_stage, cfg.train.precision, plan.global_batch, cfg.data.seq_len,
    )  # fmt: skip

    trainer = Trainer(
        cfg=cfg, engine=engine, data=data, state=state, tracker=tracker,
        validator=Validator(cfg.train, data.valid_batches, plan.device),
        checkpointer=checkpointer,
        downstream=DownstreamEval(cfg.downstream, cfg.train.steps, tokenizer, run_dir),
        throughput=Throughput(plan.global_batch * cfg.data.seq_len, info.flops_per_token, info.peak_flops, plan.world),
        router=RouterMonitor(engine.module, cfg.tracking.router_stats, plan.device, data_parallel_group()),
        rank=layout.rank, dp_rank=layout.dp_rank, dp=plan.dp, global_batch=plan.global_batch, device=plan.device,
    )  # fmt: skip
    with tracker:  # ends the MLflow run as FAILED or KILLED if anything raises
        trainer.train()
    if tracker.run_id:
        log.info("MLflow run %s in %s", tracker.run_id, tracker.tracking_uri)
    destroy()


def main(argv: list[str] | None = None) -> int:
    """Run training; user errors print one line and exit 2, too many non-finite steps exit 3."""
    # NCCL: a failed or timed-out collective aborts the process instead of hanging it (gloo raises by itself).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    try:
        run(argv)
    except (ConfigError, DataError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
