"""Start `fm_pretrain/train.py` on this machine with N ranks (torchrun), the way the demo and tests do.

Clusters use `deepspeed` or Slurm's `srun` with the same entry point; this is the single-node path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(extra or {})
    return env


def default_nproc() -> int:
    """All local GPUs, else 2 CPU ranks (the smallest setting that exercises data parallelism)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def train_command(config: str | os.PathLike, overrides: list[str], nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(TRAIN_SCRIPT),
        "--config",
        str(config),
        *overrides,
    ]


def launch_local(
    config: str | os.PathLike,
    overrides: list[str] | None = None,
    nproc: int | None = None,
    log_file: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """Run training to completion; output goes to `log_file` (and is returned) or to this terminal."""
    cmd = train_command(config, overrides or [], nproc or default_nproc())
    if log_file is None:
        return subprocess.run(cmd, env=train_env(), timeout=timeout, check=False)
    with open(log_file, "w") as f:
        return subprocess.run(cmd, env=train_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
