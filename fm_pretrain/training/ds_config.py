"""Build the DeepSpeed config: ZeRO stage and engine options from ds_configs/*.json, while batch sizes,
clipping and precision come from the experiment YAML (one source of truth; a clash is an error)."""

from __future__ import annotations

import json
from pathlib import Path

from fm_pretrain.config import ConfigError, ExperimentConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def resolve_ds_config_path(path: str) -> Path:
    """A path as given, else relative to the repository root (so runs work from any directory)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise ConfigError(f"train.ds_config: DeepSpeed config not found: {path}")


def build_ds_config(cfg: ExperimentConfig, dp_size: int) -> dict:
    path = resolve_ds_config_path(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    t = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key in OWNED_KEYS:
        if key in ds and ds[key] != wanted[key]:
            raise ConfigError(
                f"{path}: key '{key}' = {ds[key]} conflicts with the experiment config ({wanted[key]}); "
                "batch sizes and clipping are set in the experiment YAML"
            )
    ds.update(wanted)
    if "fp16" in ds and ds["fp16"].get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported; use train.precision: bf16")
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    ds.setdefault("steps_per_print", 10**9)  # our loop does the logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
