"""Checkpoints on top of DeepSpeed's save/load: atomic writes, per-rank RNG, metadata, pruning, resume.

Layout of `run_dir/checkpoints/`:

    latest                  the newest complete tag; replaced atomically (tmp file + os.replace), written last
    step_<N>/               DeepSpeed's files (model, optimizer, LR scheduler, client state {step, consumed_samples})
      rng_rank<R>.pt        python / numpy / torch (/ cuda) RNG states of rank R
      meta.json             step, consumed_samples, layout {dp, zero_stage, tp}, tokenizer hash, data identity,
                            resolved config
      universal/            the layout-free form (full tensors by parameter name), written on demand (reshard.py)
      universal_tp<K>/      that form re-cut for a TP size K: rank<r>/ per TP rank, written on demand (reshard.py)
    step_<N>.tmp/           a save in progress; DeepSpeed writes here, rank 0 renames it to step_<N> when complete

A kill at any moment leaves either the previous `latest` with its complete directory, or the new one: the tag
directory is complete before the rename, and `latest` moves only after the rename.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fm_pretrain.data import DataError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d+)$")
TMP_SUFFIX = ".tmp"
META_FILE = "meta.json"
FORMAT = "fm-pretrain-checkpoint/1"
# Test hook (used by tests/test_fault_tolerance.py): os._exit(CRASH_EXIT_CODE) on rank 0 in the middle of the
# save of this step, after DeepSpeed has written the temporary tag directory and before it is renamed.
CRASH_IN_SAVE_ENV = "FM_PRETRAIN_TEST_CRASH_IN_SAVE_AT_STEP"
CRASH_EXIT_CODE = 17


@dataclass(frozen=True)
class Layout:
    """How the training state is split over ranks: a checkpoint loads natively only at the same layout."""

    dp: int
    zero_stage: int
    tp: int = 1

    def as_dict(self) -> dict[str, int]:
        return {"dp": self.dp, "zero_stage": self.zero_stage, "tp": self.tp}


def step_tag(step: int) -> str:
    return f"step_{step}"


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint '{tag}', but {ckpt_dir / tag} does not exist")
    return tag


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` atomically: a reader sees the old or the new name, never a partial file."""
    tmp = ckpt_dir / f"latest{TMP_SUFFIX}"
    with tmp.open("w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / "latest")


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, name) of the step_N directories, oldest first (temporary `.tmp` directories excluded)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name)))


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step_N directories (never the one `latest` names) and leftovers of
    interrupted saves."""
    current = latest_tag(ckpt_dir)
    removed = []
    for _, name in complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else complete_tags(ckpt_dir):
        if name != current:
            shutil.rmtree(ckpt_dir / name)
            removed.append(name)
    for p in ckpt_dir.glob(f"*{TMP_SUFFIX}"):
        if p.is_dir():
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


# ---- RNG states (every rank saves and restores its own) ----


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


# ---- save ----


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    step: int,
    consumed_samples: int,
    layout: Layout,
    meta: dict[str, Any],
    keep_last: int,
    universal_info: dict[str, Any] | None = None,
) -> Path:
    """Save a complete checkpoint atomically; all ranks call this. Returns the final tag directory.

    `meta` (resolved config, tokenizer hash) goes to meta.json next to the layout, step and data position.
    `universal_info` is DeepSpeed's UNIVERSAL_CHECKPOINT_INFO (how tensor-parallel shards merge), needed by
    the offline conversion to the layout-free form; without tensor parallelism the default says "nothing split".
    """
    rank = dist.get_rank()
    tag = step_tag(step)
    tmp_tag = tag + TMP_SUFFIX
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp_dir.exists():  # left over by a save that was killed
            shutil.rmtree(tmp_dir)
    dist.barrier()
    client_state = {
        "step": step,
        "consumed_samples": consumed_samples,
        "universal_checkpoint_info": universal_info or {"universal_checkpoint_version": 0.2},
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), rng_file(tmp_dir, rank))
    if rank == 0:
        record = {"format": FORMAT, "step": step, "consumed_samples": consumed_samples, "layout": layout.as_dict()}
        (tmp_dir / META_FILE).write_text(json.dumps({**record, **meta}, indent=1, default=str))
    dist.barrier()  # every rank's files are in tmp_dir
    if rank == 0:
        if os.environ.get(CRASH_IN_SAVE_ENV) == str(step):
            log.warning("test hook %s: exiting in the middle of saving %s", CRASH_IN_SAVE_ENV, tag)
            os._exit(CRASH_EXIT_CODE)
        _replace_dir(tmp_dir, final_dir)
        write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return final_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an older dst of the same name (a re-run over old checkpoints) is moved aside first."""
    if dst.exists():
        old = dst.with_name(dst.name + ".old" + TMP_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


# ---- resume ----


def read_meta(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {tag_dir} is not a complete fm-pretrain checkpoint")
    return json.loads(path.read_text())


def find_resume(ckpt_dir: Path, resume: bool, resume_from: str | None) -> Path | None:
    """The tag directory to resume from, or None for a fresh start.

    `resume_from` (a step_N directory, or a checkpoints directory with a `latest`) must exist: asking for a
    checkpoint that is not there is an error, never a fresh start. With `resume` alone, the run continues from
    `ckpt_dir/latest` when it exists; step_N directories without a `latest` pointer are an error too.
    """
    if resume_from:
        path = Path(resume_from)
        if (path / "latest").is_file():
            path = path / latest_tag(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"train.resume_from: no checkpoint at {resume_from} (expected {path / META_FILE})")
        return path
    if not resume:
        return None
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
    layout: Layout,
    tokenizer_sha256: str | None,
    data: dict[str, Any] | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Load model, optimizer, scheduler and RNG states; returns meta.json ({step, consumed_samples, ...}).

    At the layout the checkpoint was written with, DeepSpeed loads its own files (bit-exact). At another
    layout (data-parallel size, ZeRO stage), the checkpoint goes through DeepSpeed's universal form.
    `data` is this run's data identity (data_identity.py): checked against the checkpoint's before anything loads.
    """
    from fm_pretrain.training.data_identity import check_data_identity
    from fm_pretrain.training.reshard import load_resharded

    meta = read_meta(tag_dir)
    saved_sha = meta.get("tokenizer_sha256")
    if saved_sha and tokenizer_sha256 and saved_sha != tokenizer_sha256:
        raise DataError(
            f"{tag_dir / META_FILE}: tokenizer_sha256 {saved_sha[:12]}... differs from data.tokenizer's "
            f"{tokenizer_sha256[:12]}...; this checkpoint was trained on other token ids"
        )
    if data is not None:
        check_data_identity(meta, data, allow_data_change, str(tag_dir / META_FILE))
    saved = Layout(**meta["layout"])
    if saved == layout:
        load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    else:
        log.info("checkpoint layout %s differs from this run's %s: resharding", saved, layout)
        load_resharded(engine, tag_dir, saved, layout)
    rank = dist.get_rank()
    if saved.dp * saved.tp == dist.get_world_size() and rng_file(tag_dir, rank).is_file():
        set_rng_state(torch.load(rng_file(tag_dir, rank), weights_only=False))
    else:  # other world size: no saved state for this rank; derive one deterministically
        seed = int(meta["config"]["train"]["seed"]) if "config" in meta else 0
        set_rng_state_from_seed(seed + 1000003 * int(meta["step"]) + rank)
        log.warning("world size changed: RNG states re-seeded from (seed, step, rank)")
    return meta


def set_rng_state_from_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
