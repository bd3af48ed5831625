"""Pack JSONL corpora into token shards (the logic behind data_prep/pack.py).

1. Validate every input line with the streaming reader: a bad line fails with DataError naming
   file:line, or (on_bad_line="skip") is counted. Empty texts are rejected and counted.
2. Hold out whole documents for validation: a seeded permutation over the accepted documents.
3. Load the accepted texts with HF datasets and tokenize with Dataset.map(batched, num_proc). The
   datasets cache lives in a temporary directory that is deleted afterwards, and the map fingerprint
   includes the tokenizer's sha256, so a retrained tokenizer can never reuse stale token ids.
4. Write the shards of each split (ShardWriter), then meta.json last.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from tqdm.auto import tqdm

from fm_pretrain.data import DataError
from fm_pretrain.data.jsonl import iter_jsonl
from fm_pretrain.data.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    ShardWriter,
    token_dtype,
    write_meta,
)
from fm_pretrain.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "valid")
DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB per uint16 shard
_SHARD_FILE = re.compile(r"^(train|valid)_\d{5}\.(bin|idx\.npy)(\.tmp)?$")


@dataclass
class SourceStats:
    path: str
    sha256: str
    bytes: int
    docs_in: int = 0  # non-blank lines
    docs_train: int = 0
    docs_valid: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {"bad_line": 0, "empty": 0})


@dataclass
class PackSummary:
    output_dir: str
    sources: list[SourceStats]
    tokens: dict[str, int]  # per split, bos/eos included
    bad_line_examples: list[str]  # the first few "file:line: reason" of skipped lines

    @property
    def docs_in(self) -> int:
        return sum(s.docs_in for s in self.sources)

    def docs(self, split: str) -> int:
        return sum(s.docs_train if split == "train" else s.docs_valid for s in self.sources)

    @property
    def rejected(self) -> dict[str, int]:
        return {k: sum(s.rejected[k] for s in self.sources) for k in ("bad_line", "empty")}

    def format(self) -> str:
        rej = self.rejected
        lines = [f"packed into {self.output_dir}"]
        for s in self.sources:
            lines.append(
                f"  {s.path}: {s.docs_in} docs in -> train {s.docs_train}, valid {s.docs_valid}, "
                f"rejected bad_line {s.rejected['bad_line']}, empty {s.rejected['empty']}"
            )
        lines.append(
            f"docs in {self.docs_in} = train {self.docs('train')} + valid {self.docs('valid')} "
            f"+ rejected {sum(rej.values())} (bad_line {rej['bad_line']}, empty {rej['empty']})"
        )
        lines.append(f"tokens written (with bos/eos): train {self.tokens['train']:,}, valid {self.tokens['valid']:,}")
        lines += [f"  skipped {e}" for e in self.bad_line_examples]
        return "\n".join(lines)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _validate(path: str, text_field: str, on_bad_line: str, examples: list[str]) -> tuple[SourceStats, np.ndarray]:
    """Count documents and rejections of one file; returns its stats and a mask of accepted docs."""
    stats = SourceStats(path=path, sha256=_file_sha256(path), bytes=os.path.getsize(path))

    def skip(line_no: int, reason: str) -> None:
        stats.docs_in += 1
        stats.rejected["bad_line"] += 1
        if len(examples) < 5:
            examples.append(f"{path}:{line_no}: {reason}")

    accepted = []
    for _, text in iter_jsonl(path, text_field, on_bad_line=skip if on_bad_line == "skip" else None):
        stats.docs_in += 1
        ok = bool(text.strip())
        stats.rejected["empty"] += not ok
        accepted.append(ok)
    return stats, np.asarray(accepted, dtype=bool)


def _accepted_texts(paths: list[str], text_field: str) -> Iterator[dict[str, str]]:
    # Bad lines were already counted (or failed) in validation; here they are only skipped.
    for path in paths:
        for _, text in iter_jsonl(path, text_field, on_bad_line=lambda *_: None):
            if text.strip():
                yield {"text": text}


def _tokenize(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    return {"input_ids": tokenizer.encode_batch(batch["text"])}


def holdout_mask(n_docs: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the documents held out for validation: a seeded choice of whole documents."""
    n_valid = int(round(valid_fraction * n_docs))
    if valid_fraction > 0 and n_docs >= 2:
        n_valid = min(max(n_valid, 1), n_docs - 1)  # at least one of each split when asked for both
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_docs)[:n_valid]] = True
    return mask


def pack(
    inputs: Sequence[str | os.PathLike],
    tokenizer_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    text_field: str = "text",
    valid_fraction: float = 0.05,
    num_proc: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = 1234,
    on_bad_line: Literal["fail", "skip"] = "fail",
    progress: bool = True,
) -> PackSummary:
    """Tokenize JSONL `inputs` and write a packed directory (see docs/data.md). Returns the counts."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if on_bad_line not in ("fail", "skip"):
        raise ValueError(f"on_bad_line must be 'fail' or 'skip', got {on_bad_line!r}")
    paths = [os.fspath(p) for p in inputs]
    if not paths:
        raise ValueError("no input files")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"input file not found: {p}")
    tokenizer = Tokenizer(tokenizer_path)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output is not a directory: {out}")

    examples: list[str] = []
    sources, masks = [], []
    for p in tqdm(paths, desc="validate", unit="file", disable=not progress):
        stats, mask = _validate(p, text_field, on_bad_line, examples)
        sources.append(stats)
        masks.append(mask)
    n_accepted = int(sum(m.sum() for m in masks))
    if n_accepted == 0:
        raise DataError(f"no non-empty documents in {paths}")
    is_valid = holdout_mask(n_accepted, valid_fraction, seed)

    out.mkdir(parents=True, exist_ok=True)
    # Invalidate an older packing first: without meta.json the directory reads as incomplete.
    (out / META_FILE).unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    with tempfile.TemporaryDirectory(prefix="fm-pack-") as cache_dir:
        ds = _tokenized_dataset(paths, text_field, tokenizer, num_proc, cache_dir, progress)
        ids_iter = (ids for batch in ds.iter(batch_size=1024) for ids in batch["input_ids"])
        for k, ids in enumerate(tqdm(ids_iter, total=n_accepted, desc="write", unit="doc", disable=not progress)):
            if k >= n_accepted:
                raise DataError("inputs changed while packing (more documents than validated)")
            framed = np.empty(len(ids) + 2, dtype=np.int64)
            framed[0], framed[1:-1], framed[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
            writers["valid" if is_valid[k] else "train"].add(framed)
    split_meta = {s: w.close() for s, w in writers.items()}
    if sum(m["num_docs"] for m in split_meta.values()) != n_accepted:
        raise DataError("inputs changed while packing (fewer documents than validated)")

    start = 0
    for stats, mask in zip(sources, masks):
        file_valid = is_valid[start : start + int(mask.sum())]
        start += len(file_valid)
        stats.docs_valid = int(file_valid.sum())
        stats.docs_train = len(file_valid) - stats.docs_valid

    summary = PackSummary(
        output_dir=str(out),
        sources=sources,
        tokens={s: m["num_tokens"] for s, m in split_meta.items()},
        bad_line_examples=examples,
    )
    if summary.docs_in != summary.docs("train") + summary.docs("valid") + sum(summary.rejected.values()):
        raise AssertionError(f"document counts do not reconcile:\n{summary.format()}")  # a bug here
    _remove_stale_shards(out, split_meta)
    write_meta(out, _meta(tokenizer, dtype, split_meta, summary, text_field, valid_fraction, seed))
    return summary


def _tokenized_dataset(
    paths: list[str], text_field: str, tokenizer: Tokenizer, num_proc: int, cache_dir: str, progress: bool
) -> datasets.Dataset:
    """A dataset with the token ids ("input_ids") of every accepted document, in input order."""
    # Imported here: datasets is slow to import, and the offline settings must precede the import
    # (otherwise it probes the network; there is nothing to fetch for local JSONL files).
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    # from_generator rather than load_dataset("json"): only the validated text column is loaded, so
    # skipped lines and unrelated fields with mixed types never reach Arrow's schema inference.
    ds = datasets.Dataset.from_generator(
        _accepted_texts,
        gen_kwargs={"paths": paths, "text_field": text_field},
        features=datasets.Features({"text": datasets.Value("string")}),
        cache_dir=cache_dir,
    )
    fingerprint = hashlib.sha256(f"{ds._fingerprint}-tokenize-{tokenizer.sha256}".encode()).hexdigest()[:32]
    ds = ds.map(
        _tokenize,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["text"],
        new_fingerprint=fingerprint,
        desc="tokenize",
    )
    return ds


def _remove_stale_shards(out: Path, split_meta: dict[str, Any]) -> None:
    keep = {f for m in split_meta.values() for s in m["shards"] for f in (s["bin"], s["idx"])}
    for f in out.iterdir():
        if _SHARD_FILE.match(f.name) and f.name not in keep:
            f.unlink()


def _meta(
    tokenizer: Tokenizer,
    dtype: np.dtype,
    split_meta: dict[str, Any],
    summary: PackSummary,
    text_field: str,
    valid_fraction: float,
    seed: int,
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": {"<u2": "uint16", "<u4": "uint32"}[dtype.str],
        "byte_order": "little",
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_path": str(Path(tokenizer.path).resolve()),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "document_layout": "[bos] + tokens + [eos]",
        "text_field": text_field,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "splits": split_meta,
        "docs_in": summary.docs_in,
        "rejected": summary.rejected,
        "sources": [
            {
                "path": str(Path(s.path).resolve()),
                "sha256": s.sha256,
                "bytes": s.bytes,
                "docs_in": s.docs_in,
                "docs_train": s.docs_train,
                "docs_valid": s.docs_valid,
                "rejected": s.rejected,
            }
            for s in summary.sources
        ],
    }
