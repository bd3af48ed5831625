"""Resuming: which checkpoint a run continues from (and when that is an error), and loading it into an engine
at the layout it was written with (DeepSpeed's own files, bit-exact) or at another one (reshard.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fm_pretrain.data import DataError
from fm_pretrain.data.identity import check_data_identity

from .format import META_FILE, CheckpointLayout, complete_tags, latest_tag, read_layout, read_meta, resolve_step_dir
from .reshard import load_resharded
from .rng import restore_rng

log = logging.getLogger(__name__)


def find_resume(ckpt_dir: Path, resume: bool, resume_from: str | None) -> Path | None:
    """The tag directory to resume from, or None for a fresh start.

    `resume_from` (a step_N directory, or a checkpoints or run directory whose `latest` names one) must exist:
    asking for a checkpoint that is not there is an error, never a fresh start. With `resume` alone, the run
    continues from `ckpt_dir/latest` when it exists; step_N directories without a `latest` pointer are an error.
    """
    if resume_from:
        try:
            path = resolve_step_dir(Path(resume_from))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"train.resume_from: no checkpoint at {resume_from} ({e})") from None
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"train.resume_from: no checkpoint at {resume_from} (expected {path / META_FILE})")
        return path
    if not resume:
        return None
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is None:
        if complete_tags(ckpt_dir):
            names = [n for _, n in complete_tags(ckpt_dir)]
            raise FileNotFoundError(
                f"{ckpt_dir} holds checkpoints {names} but no 'latest' pointer; pass train.resume_from=<dir> "
                "to pick one, or train.resume=false to start from scratch"
            )
        return None
    return ckpt_dir / tag


def load_checkpoint(
    engine,
    tag_dir: Path,
    layout: CheckpointLayout,
    tokenizer_sha256: str | None,
    data: dict[str, Any] | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Load model, optimizer, scheduler and RNG states; returns meta.json ({step, consumed_samples, ...}).

    At the layout the checkpoint was written with, DeepSpeed loads its own files (bit-exact). At another
    layout (tensor-parallel size, data-parallel size, ZeRO stage) it goes through the universal form (reshard.py).
    `data` is this run's data identity (fm_pretrain/data/identity.py): checked against the checkpoint's, like the
    tokenizer hash, before anything loads.
    """
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    saved_sha = meta.get("tokenizer_sha256")
    if saved_sha and tokenizer_sha256 and saved_sha != tokenizer_sha256:
        raise DataError(
            f"{tag_dir / META_FILE}: tokenizer_sha256 {saved_sha[:12]}... differs from data.tokenizer's "
            f"{tokenizer_sha256[:12]}...; this checkpoint was trained on other token ids"
        )
    if data is not None:
        check_data_identity(meta, data, allow_data_change, str(tag_dir / META_FILE))
    saved = read_layout(meta)
    if saved == layout:
        load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    else:
        log.info("checkpoint layout %s differs from this run's %s: resharding", saved, layout)
        load_resharded(engine, tag_dir, saved, layout)
    seed = int(meta["config"]["train"]["seed"]) if "config" in meta else 0
    same_world = saved.dp * saved.tp == dist.get_world_size()
    if not restore_rng(tag_dir, dist.get_rank(), same_world, seed, int(meta["step"])):
        log.warning("world size changed: RNG states re-seeded from (seed, step, rank)")
    return meta
