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
import logging
import math
import time
from datetime import timedelta
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
from fm_pretrain.data.blend import build_train_valid
from fm_pretrain.data.packed import micro_batches
from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.eval import during_training as downstream
from fm_pretrain.model import DecoderLM
from fm_pretrain.model.flops import peak_flops_per_device, training_flops_per_token
from fm_pretrain.parallel.state import (
    DeepSpeedMPU,
    ParallelLayout,
    initialize_model_parallel,
    seed_tensor_parallel_rng,
)
from fm_pretrain.tracking import Tracker
from fm_pretrain.training.checkpoint import Layout, find_resume, load_checkpoint, save_checkpoint
from fm_pretrain.training.data_identity import data_identity
from fm_pretrain.training.ds_config import build_ds_config, zero_stage
from fm_pretrain.training.guards import (
    NONFINITE_EXIT_CODE,
    NonFiniteError,
    NonFiniteGuard,
    delay_step_for_tests,
    guarded_loss,
    injected_nonfinite_steps,
)
from fm_pretrain.training.metrics_log import METRICS_FILE, append_metrics, truncate_metrics
from fm_pretrain.training.schedules import build_scheduler
from fm_pretrain.training.signals import StopRequest

log = logging.getLogger("fm_pretrain.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def init_distributed(
    tensor_parallel: int = 1, timeout_s: float = 600.0
) -> tuple[int, int, torch.device, ParallelLayout]:
    """The default process group, then megatron-core's TP x DP groups: the data sampler and ZeRO work over
    the data-parallel group (layout.dp_rank / layout.dp), every TP rank of a group sees the same batch."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))  # dead rank -> error
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ConfigError(f"parallel.tensor_parallel: {tensor_parallel} does not divide the number of ranks ({world})")
    # The TP and DP groups get the same collective timeout as the default group (ZeRO's all-reduces use DP's).
    return rank, world, device, initialize_model_parallel(tensor_parallel, timeout_s)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg: ExperimentConfig = load_config(args.config, args.overrides)
    rank, world, device, layout = init_distributed(cfg.parallel.tensor_parallel, cfg.train.collective_timeout_s)
    dp_rank, dp_size = layout.dp_rank, layout.dp
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    # ---- data: one packed directory (data.path) or a blend (data.blend); tokenizer hashes must agree ----
    tokenizer = Tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    sha = tokenizer.sha256 if tokenizer else None
    data = build_train_valid(cfg.data, sha, cfg.train.micro_batch_size, dp_size, cfg.train.eval_batches, dp_rank)
    cfg.model.vocab_size = data.vocab_size
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * dp_size
    # The sample order is a function of the global sample number: `consumed` (checkpointed) is its position.
    train_ds, sampler, valid_batches = data.train, data.sampler, data.valid_batches

    # ---- model, optimizer, schedule, DeepSpeed engine ----
    if "fm" in cfg.model.layer_pattern:
        try:  # fail here, naming the key, rather than at the first forward
            resolve_backend(cfg.model.fm.backend, device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"model.fm.backend: {e}") from None
    seed_tensor_parallel_rng(cfg.train.seed)  # identical initial weights on every rank (TP: shards of them)
    model = DecoderLM(cfg.model, cfg.parallel)
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
    ds_config = build_ds_config(cfg, dp_size)
    downstream.check_zero_stage(cfg.eval, zero_stage(ds_config))
    # mpu: ZeRO partitions and averages over the data-parallel group only, and the grad norm for clipping
    # sums each TP shard once and each replicated parameter once.
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=DeepSpeedMPU()
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops_per_device(device_name, cfg.train.precision, cfg.train.peak_tflops)

    # ---- resume (train.resume_from, else run_dir/checkpoints/latest; at another layout it reshards) ----
    ckpt_layout = Layout(dp=dp_size, zero_stage=zero_stage(ds_config), tp=layout.tp)
    identity = data_identity(train_ds, sampler)  # what fixes the sample order; compared on resume
    ckpt_meta = {"tokenizer_sha256": sha, "data": identity, "config": to_dict(cfg)}
    step, consumed = 0, 0
    metrics_path = run_dir / METRICS_FILE
    resume_dir = find_resume(ckpt_dir, cfg.train.resume, cfg.train.resume_from)
    if resume_dir is not None:
        meta = load_checkpoint(engine, resume_dir, ckpt_layout, sha, identity, cfg.train.allow_data_change)
        step, consumed = int(meta["step"]), int(meta["consumed_samples"])
        log.info("resumed from %s at step %d (%d samples consumed)", resume_dir, step, consumed)
        if rank == 0:
            truncate_metrics(metrics_path, step)  # the steps after the checkpoint are replayed: log them once

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
                append_metrics(metrics_path, 0, {"val/loss": val0})
            log.info("step 0  validation loss %.4f", val0)
        engine.train()
        tokens_per_step = global_batch * cfg.data.seq_len
        t_last, steps_since_log, losses_since_log = time.perf_counter(), 0, []
        stop = StopRequest(enabled=cfg.train.save_on_signal)
        guard = NonFiniteGuard(engine, cfg.train.max_consecutive_nonfinite, zero_stage(ds_config))
        inject_nonfinite = injected_nonfinite_steps()  # test hook, empty unless its env var is set
        while step < cfg.train.steps:
            batches = micro_batches(
                train_ds, sampler, consumed, global_batch, cfg.train.micro_batch_size, dp_rank, dp_size
            )
            step_loss, step_aux = 0.0, 0.0
            for batch in batches:
                out = engine(**{k: v.to(device) for k, v in batch.items()})
                engine.backward(guarded_loss(out.loss, step + 1, rank, inject_nonfinite))
                engine.step()  # DeepSpeed applies the update only at the gradient-accumulation boundary
                step_loss += float(out.lm_loss.detach()) / len(batches)
                if out.aux_loss is not None:
                    step_aux += float(out.aux_loss.detach()) / len(batches)
            step += 1
            consumed += global_batch  # a skipped step's batch is not retried
            if not guard.after_step(step, step_loss):  # skipped steps stay out of train/loss
                losses_since_log.append((step_loss, step_aux))
            steps_since_log += 1

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                n_window = len(losses_since_log)
                window = [sum(x[i] for x in losses_since_log) / n_window if n_window else math.nan for i in (0, 1)]
                loss, aux = all_reduce_mean(window, device)
                elapsed = time.perf_counter() - t_last
                tok_s = tokens_per_step * steps_since_log / elapsed
                metrics = {
                    "train/loss": loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "perf/tokens_per_s": tok_s,
                    "perf/step_time_s": elapsed / steps_since_log,
                    "train/consumed_samples": consumed,
                    "train/skipped_steps": guard.total,
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
                    append_metrics(metrics_path, step, metrics)
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
                    append_metrics(metrics_path, step, val_metrics)
                log.info("step %d  validation loss %.4f", step, val)

            if downstream.due(cfg.eval, step, cfg.train.steps):  # English/Japanese tasks, scored on rank 0
                downstream.evaluate_in_training(cfg.eval, engine.module, tokenizer, step, rank, tracker, run_dir)
                t_last = time.perf_counter()  # evaluation time is not training throughput

            delay_step_for_tests()  # test hook, no-op unless its env var is set
            stopping = stop.agreed(device)  # SIGTERM/SIGUSR1 on any rank: every rank stops after this step
            if step % cfg.train.save_every == 0 or step == cfg.train.steps or stopping:
                save_checkpoint(
                    engine, ckpt_dir, step, consumed, ckpt_layout, ckpt_meta, cfg.train.keep_last,
                    universal_info=model.universal_checkpoint_info,
                )  # fmt: skip
                t_last = time.perf_counter()  # checkpoint time is not training throughput
            if stopping:
                log.warning("stop signal %s: saved the checkpoint of step %d, exiting", stop.received, step)
                break
        stop.restore()

    if rank == 0 and tracker.run_id:
        log.info("MLflow run %s in %s", tracker.run_id, tracker.tracking_uri)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # NCCL: a failed or timed-out collective aborts the process instead of hanging it (gloo raises by itself).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    try:
        sys.exit(main())
    except (ConfigError, DataError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(NONFINITE_EXIT_CODE)
