"""Checkpoint directory layout on top of DeepSpeed's save/load: tags `step_<N>`, the `latest` pointer
(written by DeepSpeed after the tag directory), pruning to the last N."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

TAG_RE = re.compile(r"^step_(\d+)$")


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


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` step_N directories; never the one `latest` points to."""
    current = latest_tag(ckpt_dir)
    tags = sorted((int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name)))
    removed = []
    for _, name in tags[:-keep_last] if keep_last > 0 else tags:
        if name != current:
            shutil.rmtree(ckpt_dir / name)
            removed.append(name)
    return removed
