"""The on-disk format of fm-pretrain checkpoints: names, the `latest` pointer, meta.json and the layout record.

Layout of `run_dir/checkpoints/`:

    latest                  the newest complete tag; replaced atomically (tmp file + os.replace), written last
    latest.tmp              a pointer being written (a crash may leave it; never read)
    step_<N>/               DeepSpeed's files (model, optimizer, LR scheduler, client state {step, consumed_samples,
                            universal_checkpoint_info}); the file names depend on the ZeRO stage and TP rank
      rng_rank<R>.pt        python / numpy / torch (/ cuda) RNG states of rank R (rng.py)
      meta.json             format, step, consumed_samples, layout {dp, zero_stage, tp}, tokenizer_sha256, data
                            identity (fm_pretrain/data/identity.py), resolved config
      universal/            the layout-free form, written on demand (reshard.py): zero/<parameter name>/{fp32,
                            exp_avg, exp_avg_sq, step}.pt hold full (TP = 1) tensors; zero/optimizer_state.pt the
                            optimizer's common state; the model-states files (LR scheduler, client state) under the
                            names both ZeRO 1/2 and ZeRO-3 look for
      universal_tp<K>/      that form re-cut for a TP size K: rank<r>/ per TP rank, written on demand (reshard.py)
      model_fp32.pt         `python -m fm_pretrain.checkpoint export`'s default output: {name: full fp32 tensor}
      eval_results.json     `python -m fm_pretrain.eval`'s results for this checkpoint
    step_<N>.tmp/           a save in progress; DeepSpeed writes here, rank 0 renames it to step_<N> when complete
    zero_to_fp32.py         DeepSpeed's own consolidation script (written by DeepSpeed, not used here)

A kill at any moment leaves either the previous `latest` with its complete directory, or the new one: the tag
directory is complete before the rename, and `latest` moves only after the rename. Derived directories
(`universal/`, `universal_tp<K>/`) are written to `<name>.tmp` and renamed when complete, so they too are
either absent or whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "fm-pretrain-checkpoint/1"  # meta.json's "format"
TAG_RE = re.compile(r"^step_(\d+)$")
TMP_SUFFIX = ".tmp"
LATEST_FILE = "latest"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"  # inside a run directory
UNIVERSAL_DIR = "universal"


@dataclass(frozen=True)
class CheckpointLayout:
    """How the training state of a checkpoint is split over ranks (meta.json's "layout"): a checkpoint loads
    natively only at the same layout, otherwise it is resharded (reshard.py)."""

    dp: int
    zero_stage: int
    tp: int = 1

    def as_dict(self) -> dict[str, int]:
        return {"dp": self.dp, "zero_stage": self.zero_stage, "tp": self.tp}


def step_tag(step: int) -> str:
    return f"step_{step}"


def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank}.pt"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `ckpt_dir/latest` names, None without a pointer; a pointer to a missing directory is an error."""
    pointer = Path(ckpt_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint '{tag}', but {Path(ckpt_dir) / tag} does not exist")
    return tag


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` atomically: a reader sees the old or the new name, never a partial file."""
    tmp = Path(ckpt_dir) / f"{LATEST_FILE}{TMP_SUFFIX}"
    with tmp.open("w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(ckpt_dir) / LATEST_FILE)


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, name) of the step_N directories, oldest first (temporary `.tmp` directories excluded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name)))


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step_N directories (never the one `latest` names) and leftovers of
    interrupted saves; returns the names removed."""
    ckpt_dir = Path(ckpt_dir)
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


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """meta.json of a step directory; missing, the directory is not a complete checkpoint of ours."""
    path = Path(tag_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {tag_dir} is not a complete fm-pretrain checkpoint")
    return json.loads(path.read_text())


def write_meta(tag_dir: Path, step: int, consumed_samples: int, layout: CheckpointLayout, extra: dict) -> None:
    """meta.json: the format's own record ({format, step, consumed_samples, layout}), then `extra`."""
    record = {"format": FORMAT, "step": step, "consumed_samples": consumed_samples, "layout": layout.as_dict()}
    (Path(tag_dir) / META_FILE).write_text(json.dumps({**record, **extra}, indent=1, default=str))


def read_layout(meta: dict[str, Any]) -> CheckpointLayout:
    return CheckpointLayout(**meta["layout"])


def resolve_step_dir(path: Path) -> Path:
    """A step_N directory as given, or the one `latest` names in a checkpoints directory or in a run directory."""
    path = Path(path)
    for base in (path, path / CHECKPOINTS_DIR):
        if (base / LATEST_FILE).is_file():
            tag = latest_tag(base)
            if tag is not None:
                return base / tag
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {META_FILE}) and no checkpoints/latest to follow")
    return path


def replace_dir(src: Path, dst: Path) -> None:
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
