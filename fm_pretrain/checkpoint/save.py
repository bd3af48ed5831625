"""Saving a checkpoint atomically (all ranks): DeepSpeed's files, every rank's RNG states and meta.json go to
`step_N.tmp/`, which rank 0 renames to `step_N/` once complete; only then does `latest` move (format.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fm_pretrain.testing import faults

from .format import TMP_SUFFIX, CheckpointLayout, prune, replace_dir, step_tag, write_latest, write_meta
from .rng import save_rng


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    step: int,
    consumed_samples: int,
    layout: CheckpointLayout,
    meta: dict[str, Any],
    keep_last: int,
    universal_info: dict[str, Any] | None = None,
) -> Path:
    """Save a complete checkpoint atomically; all ranks call this. Returns the final tag directory.

    `meta` (resolved config, tokenizer hash, data identity) goes to meta.json next to the layout, step and data
    position. `universal_info` is DeepSpeed's UNIVERSAL_CHECKPOINT_INFO (how tensor-parallel shards merge),
    needed by the conversion to the layout-free form; without tensor parallelism the default says "nothing split".
    Afterwards the newest `keep_last` step directories are kept (prune).
    """
    rank = dist.get_rank()
    tag = step_tag(step)
    tmp_tag = tag + TMP_SUFFIX
    tmp_dir, final_dir = Path(ckpt_dir) / tmp_tag, Path(ckpt_dir) / tag
    if rank == 0:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        if tmp_dir.exists():  # left over by a save that was killed
            shutil.rmtree(tmp_dir)
    dist.barrier()
    client_state = {
        "step": step,
        "consumed_samples": consumed_samples,
        "universal_checkpoint_info": universal_info or {"universal_checkpoint_version": 0.2},
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    save_rng(tmp_dir, rank)
    if rank == 0:
        write_meta(tmp_dir, step, consumed_samples, layout, meta)
    dist.barrier()  # every rank's files are in tmp_dir
    if rank == 0:
        faults.in_save(step, rank)  # test hook: a crash with the temporary directory complete, not yet renamed
        replace_dir(tmp_dir, final_dir)
        write_latest(Path(ckpt_dir), tag)
        prune(Path(ckpt_dir), keep_last)
    dist.barrier()
    return final_dir
