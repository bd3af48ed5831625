"""Pretraining entry point: `deepspeed fm_pretrain/train.py --config configs/X.yaml [section.key=value ...]`.

Also runs under torchrun (`torchrun --nproc_per_node N fm_pretrain/train.py ...`); on a machine without
CUDA it trains on CPU with gloo. Reads top to bottom: config -> distributed -> data -> model -> engine
-> (resume) -> loop (train, validate, log, checkpoint) -> finish.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script, Python puts fm_pretrain/ itself on sys.path, where data/, model/ and config.py would
    # shadow unrelated top-level modules of those names. Import the package by its name instead.
    sys.path.pop(0)

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed
import torch.distributed as dist
import yaml

from fm_kernels.fm import resolve_backend
from fm_pretrain.config import ConfigError, ExperimentConfig, load_config, to_dict
from fm_pretrain.data import DataError
from fm_pretrain.data.packed import GlobalSampler, PackedDataset, micro_batches
from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.model import DecoderLM
from fm_pretrain.model.flops import peak_flops_per_device, training_flops_per_token
from fm_pretrain.tracking import Tracker
from fm_pretrain.training.checkpoint import latest_tag, prune, step_tag
from fm_pretrain.training.ds_config import build_ds_config, zero_stage
from fm_pretrain.training.schedules import build_scheduler

log = logging.getLogger("fm_pretrain.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int, torch.device]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@torch.no_grad()
def evaluate(engine, batches: list[dict], device: torch.device) -> float:
    """Token-weighted validation loss over this rank's batches, combined over all ranks."""
    engine.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = engine(**batch)
        n = int((batch["labels"] != -100).sum())
        loss_sum += float(out.lm_loss) * n
        tokens += n
    engine.train()
    t = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1])


def append_metrics(path: Path, step: int, metrics: dict) -> None:
    """metrics.jsonl in the run dir: one line per logged step, readable without MLflow."""
    with path.open("a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg: ExperimentConfig = load_config(args.config, args.overrides)
    rank, world, device = init_distributed()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    # ---- data: tokenizer and packed splits must agree (same tokenizer hash) ----
    tokenizer = Tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    sha = tokenizer.sha256 if tokenizer else None
    train_ds = PackedDataset(cfg.data.path, "train", cfg.data.seq_len, expect_tokenizer_sha256=sha)
    valid_ds = PackedDataset(cfg.data.path, "valid", cfg.data.seq_len, expect_tokenizer_sha256=sha)
    cfg.model.vocab_size = int(train_ds.meta["vocab_size"])
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    sampler = GlobalSampler(len(train_ds), seed=cfg.data.seed)
    # Validation: the first eval_batches micro-batches per rank, in a fixed order (fewer if the split is small).
    per_global_micro = cfg.train.micro_batch_size * world
    n_valid = min(cfg.train.eval_batches, len(valid_ds) // per_global_micro) * per_global_micro
    if n_valid == 0:
        raise ValueError(
            f"{cfg.data.path}: the valid split has {len(valid_ds)} sequences of {cfg.data.seq_len} tokens, fewer "
            f"than one micro-batch per rank ({per_global_micro} in all); pack more validation data"
        )
    valid_sampler = GlobalSampler(len(valid_ds), seed=cfg.data.seed, shuffle=False)
    valid_batches = micro_batches(valid_ds, valid_sampler, 0, n_valid, cfg.train.micro_batch_size, rank, world)

    # ---- model, optimizer, schedule, DeepSpeed engine ----
    if "fm" in cfg.model.layer_pattern:
        try:  # fail here, naming the key, rather than at the first forward
            resolve_backend(cfg.model.fm.backend, device)
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(f"model.fm.backend: {e}") from None
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = DecoderLM(cfg.model)
    # Counted before DeepSpeed wraps the model: ZeRO-3 partitions parameters and their numel reads 0 after.
    n_params = model.num_params()
    flops_per_token = training_flops_per_token(model, cfg.data.seq_len)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ds_config = build_ds_config(cfg, world)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops_per_device(device_name, cfg.train.precision, cfg.train.peak_tflops)

    # ---- resume ----
    step, consumed = 0, 0
    if cfg.train.resume and ckpt_dir.is_dir() and latest_tag(ckpt_dir) is not None:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir))
        if load_path is None:
            raise RuntimeError(f"could not load the latest checkpoint from {ckpt_dir}")
        step, consumed = client_state["step"], client_state["consumed_samples"]
        log.info("resumed from %s at step %d (%d samples consumed)", load_path, step, consumed)

    # ---- tracking (rank 0 only) ----
    tracker = Tracker(cfg.tracking, run_dir, rank)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tracker.start(
        to_dict(cfg),
        resume=cfg.train.resume,
        tags={
            "model_type": cfg.model.model_type,
            "size": cfg.tracking.size,
            "zero_stage": str(zero_stage(ds_config)),
            "world_size": str(world),
            "device": device_name,
        },
    )
    if step == 0 and cfg.data.tokenizer:
        tracker.log_artifact(cfg.data.tokenizer, "tokenizer")
    log.info(
        "model %s: %.2fM parameters, %d layers %s; %d ranks on %s; ZeRO-%d, %s; global batch %d x %d tokens",
        cfg.model.model_type,
        n_params / 1e6,
        cfg.model.n_layers,
        cfg.model.layer_pattern,
        world,
        device_name,
        zero_stage(ds_config),
        cfg.train.precision,
        global_batch,
        cfg.data.seq_len,
    )

    # ---- training loop (the tracker ends the MLflow run as FAILED or KILLED if anything raises) ----
    with tracker:
        if step == 0:  # the untrained model's validation loss: where the curve starts
            val0 = evaluate(engine, valid_batches, device)
            tracker.log_metrics({"val/loss": val0}, 0)
            if rank == 0:
                append_metrics(run_dir / "metrics.jsonl", 0, {"val/loss": val0})
            log.info("step 0  validation loss %.4f", val0)
        engine.train()
        tokens_per_step = global_batch * cfg.data.seq_len
        t_last, steps_since_log, losses_since_log = time.perf_counter(), 0, []
        while step < cfg.train.steps:
            batches = micro_batches(train_ds, sampler, consumed, global_batch, cfg.train.micro_batch_size, rank, world)
            step_loss, step_aux = 0.0, 0.0
            for batch in batches:
                out = engine(**{k: v.to(device) for k, v in batch.items()})
                engine.backward(out.loss)
                engine.step()  # DeepSpeed applies the update only at the gradient-accumulation boundary
                step_loss += float(out.lm_loss.detach()) / len(batches)
                if out.aux_loss is not None:
                    step_aux += float(out.aux_loss.detach()) / len(batches)
            step += 1
            consumed += global_batch
            losses_since_log.append((step_loss, step_aux))
            steps_since_log += 1

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                n_window = len(losses_since_log)
                loss, aux = all_reduce_mean([sum(x[i] for x in losses_since_log) / n_window for i in (0, 1)], device)
                elapsed = time.perf_counter() - t_last
                tok_s = tokens_per_step * steps_since_log / elapsed
                metrics = {
                    "train/loss": loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "perf/tokens_per_s": tok_s,
                    "perf/step_time_s": elapsed / steps_since_log,
                    "train/consumed_samples": consumed,
                }
                if any(b.kind == "fm" for b in model.blocks) and cfg.model.fm.aux_loss_weight > 0:
                    metrics["train/aux_loss"] = aux  # the balancing loss, already weighted; not part of train/loss
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                if peak is not None:
                    metrics["perf/mfu"] = tok_s * flops_per_token / (peak * world)
                tracker.log_metrics(metrics, step)
                if rank == 0:
                    append_metrics(run_dir / "metrics.jsonl", step, metrics)
                log.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s%s",
                    step,
                    cfg.train.steps,
                    loss,
                    metrics["train/lr"],
                    tok_s,
                    f"  MFU {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else "",
                )
                t_last, steps_since_log, losses_since_log = time.perf_counter(), 0, []

            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                val = evaluate(engine, valid_batches, device)
                val_metrics = {"val/loss": val, "val/ppl": math.exp(min(val, 50.0))}
                tracker.log_metrics(val_metrics, step)
                if rank == 0:
                    append_metrics(run_dir / "metrics.jsonl", step, val_metrics)
                log.info("step %d  validation loss %.4f", step, val)

            if step % cfg.train.save_every == 0 or step == cfg.train.steps:
                engine.save_checkpoint(
                    str(ckpt_dir), tag=step_tag(step), client_state={"step": step, "consumed_samples": consumed}
                )
                dist.barrier()
                if rank == 0:
                    prune(ckpt_dir, cfg.train.keep_last)
                t_last = time.perf_counter()  # checkpoint time is not training throughput

    if rank == 0 and tracker.run_id:
        log.info("MLflow run %s in %s", tracker.run_id, tracker.tracking_uri)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
