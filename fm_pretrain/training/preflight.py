"""Preflight: every check that needs the machine, in one place, before any process group exists.

`config.py` checks what the config alone decides (types, ranges, heads divisible by the TP size, ...). What
depends on where the job runs is checked here, on every rank, before `init_distributed`, so a bad launch fails
at once with one line naming the key instead of hanging in a collective or dying mid-run:

- the world size (from the launcher's WORLD_SIZE) against `parallel.tensor_parallel`;
- `train.ds_config`: found, valid JSON, no clash with the batch keys the YAML owns, its ZeRO stage;
- the ZeRO stage against `downstream.enabled` (ZeRO-3 leaves no rank with whole weights to score);
- `downstream.tasks`: every name known;
- `model.fm.backend` against the device (Triton needs CUDA, or the interpreter), `model.gated_delta.backend`
  (fla needs CUDA and flash-linear-attention);
- `data.path` or `data.blend`: one of them set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fm_pretrain.config import ConfigError, ExperimentConfig
from fm_pretrain.training.ds_config import build_ds_config, zero_stage


@dataclass(frozen=True)
class Plan:
    """What the preflight established: the layout of the job and the DeepSpeed config it will run with."""

    world: int
    tp: int
    dp: int
    device: torch.device
    ds_config: dict
    zero_stage: int
    global_batch: int  # sequences per optimizer step, over all data-parallel ranks


def launch_environment() -> tuple[int, torch.device]:
    """(world size, this rank's device) as the launcher (torchrun, deepspeed, srun + torchrun) set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        return world, torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return world, torch.device("cpu")


def preflight(cfg: ExperimentConfig, world: int, device: torch.device) -> Plan:
    """Check `cfg` against this machine and launch; raise ConfigError naming the key, or return the Plan."""
    tp = cfg.parallel.tensor_parallel
    if world % tp:
        raise ConfigError(f"parallel.tensor_parallel: {tp} does not divide the number of ranks ({world})")
    dp = world // tp
    ds_config = build_ds_config(cfg, dp)
    stage = zero_stage(ds_config)
    _check_downstream(cfg, stage)
    _check_backend(cfg, device)
    _check_data(cfg)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * dp
    return Plan(world, tp, dp, device, ds_config, stage, global_batch)


def _check_downstream(cfg: ExperimentConfig, stage: int) -> None:
    d = cfg.downstream
    if not d.enabled:
        return
    if stage >= 3:
        raise ConfigError(
            "downstream.enabled: evaluation during training needs ZeRO 0-2 (ZeRO-3 partitions the weights); "
            "evaluate the saved checkpoints with `python -m fm_pretrain.eval --checkpoint STEP_DIR` instead"
        )
    from fm_pretrain.eval.tasks import resolve_tasks  # the task registry: cheap, no model import

    try:
        resolve_tasks(d.tasks)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"downstream.tasks: {err}") from None


def _check_backend(cfg: ExperimentConfig, device: torch.device) -> None:
    if "gated_delta" in cfg.model.layer_pattern:
        from fm_kernels.gated_delta import resolve_delta_backend

        try:
            resolve_delta_backend(cfg.model.gated_delta.backend, device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"model.gated_delta.backend: {e}") from None
    if "fm" not in cfg.model.layer_pattern:
        return
    from fm_kernels.fm import resolve_backend

    try:  # fail here, naming the key, rather than at the first forward
        resolve_backend(cfg.model.fm.backend, device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"model.fm.backend: {e}") from None


def _check_data(cfg: ExperimentConfig) -> None:
    """Something to train on; whether it exists and matches is the data layer's to say (naming the file)."""
    if not cfg.data.path and not cfg.data.blend:
        raise ConfigError("data.path: set data.path (a packed directory) or data.blend (a blend YAML)")
