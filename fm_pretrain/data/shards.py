"""The packed directory format on disk (torch-free, so packing workers stay light); see docs/data.md.

Layout (format version 1; later additions are extra keys that older readers ignore):
    meta.json                  written last; its presence means the directory is complete
    rejects.jsonl              every rejected document: source, line, kind, reason
    {split}_{i:05d}.bin        raw little-endian token ids (uint16 if vocab < 65536, else uint32)
    {split}_{i:05d}.idx.npy    int64 document start offsets into that shard, length n_docs + 1
    chunks/{i:05d}.json        per input chunk: the key it was packed with and its counts (for resume)
Each document is stored as [bos] + tokens + [eos]; documents never span shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fm_pretrain.data import DataError

FORMAT_NAME = "fm-pretrain-packed"
FORMAT_VERSION = 1
META_FILE = "meta.json"
REJECTS_FILE = "rejects.jsonl"
CHUNKS_DIR = "chunks"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def shard_name(split: str, i: int) -> str:
    return f"{split}_{i:05d}"


def _fsync_replace(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the bytes are on disk before the name says the file is complete
    finally:
        os.close(fd)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _fsync_replace(tmp, path)


def atomic_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def commit_shard(out_dir: Path, name: str, offsets: np.ndarray) -> dict[str, Any]:
    """Move `{name}.bin.tmp` (already written) into place with its index; returns its meta.json entry."""
    bin_path, idx_path = out_dir / f"{name}.bin", out_dir / f"{name}.idx.npy"
    idx_tmp = idx_path.with_name(idx_path.name + ".tmp")
    with open(idx_tmp, "wb") as f:  # a file object: np.save(path) would append ".npy"
        np.save(f, np.asarray(offsets, dtype=np.int64))
    _fsync_replace(bin_path.with_name(bin_path.name + ".tmp"), bin_path)
    _fsync_replace(idx_tmp, idx_path)
    return {"bin": bin_path.name, "idx": idx_path.name, "tokens": int(offsets[-1]), "docs": len(offsets) - 1}


def write_meta(out_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write meta.json atomically; call last, once every shard is in place."""
    atomic_json(Path(out_dir) / META_FILE, meta)


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"packed data directory not found: {data_dir}")
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found (not a packed directory, or packing did not finish)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: not valid JSON ({e})") from e
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return meta
