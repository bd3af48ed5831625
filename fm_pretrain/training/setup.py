"""Building a training job's parts: process groups, the model, the optimizer and schedule, the DeepSpeed engine.

Each function takes what the preflight established (`Plan`), so nothing here re-checks the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fm_pretrain.config import ExperimentConfig
from fm_pretrain.model import DecoderLM
from fm_pretrain.model.flops import peak_flops_per_device, training_flops_per_token
from fm_pretrain.parallel.state import DeepSpeedMPU, ParallelLayout, initialize_model_parallel, seed_tensor_parallel_rng
from fm_pretrain.training.guards import SkipNonFiniteAdamW
from fm_pretrain.training.preflight import Plan
from fm_pretrain.training.schedules import build_scheduler


def init_distributed(plan: Plan, timeout_s: float) -> ParallelLayout:
    """The default process group (NCCL on GPU, gloo on CPU), then megatron-core's TP x DP groups: the data
    sampler and ZeRO work over the data-parallel group, every TP rank of a group sees the same batch."""
    import deepspeed

    backend = "nccl" if plan.device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))  # dead rank -> error
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    # The TP and DP groups get the same collective timeout as the default group (ZeRO's all-reduces use DP's).
    return initialize_model_parallel(plan.tp, timeout_s)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class ModelInfo:
    """What is counted before DeepSpeed wraps the model (ZeRO-3 partitions parameters: their numel reads 0 after)."""

    n_params: int
    flops_per_token: float
    peak_flops: float | None  # per device, for MFU; None when unknown
    device_name: str
    universal_info: dict | None  # how TP shards merge, saved with every checkpoint


def build_engine(cfg: ExperimentConfig, plan: Plan):
    """(DeepSpeed engine, ModelInfo): the model with identical initial weights on every rank (TP: shards of them),
    AdamW (skipping non-finite steps itself under ZeRO-0), the LR schedule, ZeRO as the DeepSpeed config says."""
    import deepspeed

    seed_tensor_parallel_rng(cfg.train.seed)
    model = DecoderLM(cfg.model, cfg.parallel)
    device_name = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"
    info = ModelInfo(
        n_params=model.num_params(),
        flops_per_token=training_flops_per_token(model, cfg.data.seq_len),
        peak_flops=peak_flops_per_device(device_name, cfg.train.precision, cfg.train.peak_tflops),
        device_name=device_name,
        universal_info=model.universal_checkpoint_info,
    )
    # ZeRO 1-3 check for overflow before every update; at ZeRO-0 DeepSpeed calls this optimizer directly.
    adamw = SkipNonFiniteAdamW if plan.zero_stage == 0 else torch.optim.AdamW
    o = cfg.optim
    optimizer = adamw(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = build_scheduler(optimizer, o, cfg.train.steps)
    # mpu: ZeRO partitions and averages over the data-parallel group only, and the grad norm for clipping
    # sums each TP shard once and each replicated parameter once.
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=plan.ds_config, mpu=DeepSpeedMPU()
    )
    return engine, info


def destroy() -> None:
    dist.barrier()
    dist.destroy_process_group()
