"""Pack corpora into token shards (the logic behind data_prep/pack.py; format in shards.py and docs/data.md).

The main process streams each input and cuts it into chunks of about `shard_bytes` of text at line
boundaries (readers.iter_blocks: cheap, no parsing). Worker processes take one chunk each: parse and
validate its records, hold out whole documents for validation (a seeded hash of source and line),
tokenize, apply the too-long policy, and write the chunk's shards (`train_{chunk}`, `valid_{chunk}`)
under temporary names, then rename them into place and write `chunks/{chunk}.json` last. At most
2 * num_proc chunks are in flight, so memory does not grow with the corpus.

Output depends only on the inputs, the tokenizer and the options, never on num_proc or timing. A re-run
finds each chunk's marker and, when its key (tokenizer, options, the chunk's bytes) matches and its
shards are intact, reuses it: a killed run resumes and ends byte-identical to one that was not killed.
meta.json (written last) and rejects.jsonl are assembled from the chunk results in input order.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from fm_pretrain.data import DataError
from fm_pretrain.data.readers import Block, Source, detect_source, holdout_mask, iter_blocks, parse_block
from fm_pretrain.data.shards import (
    CHUNKS_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    REJECTS_FILE,
    atomic_json,
    commit_shard,
    shard_name,
    token_dtype,
    write_meta,
)
from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.testing import faults

SPLITS = ("train", "valid")
REJECT_KINDS = ("bad_line", "undecodable", "empty", "too_long")
DEFAULT_SHARD_BYTES = 32 << 20  # of input text per chunk (= per shard): ~8M tokens, a 16 MiB uint16 shard
_ENCODE_CHARS = 1 << 20  # texts per encode call: bounds the worker's Python int lists
_SHARD_FILE = re.compile(r"^(train|valid)_\d{5}\.(bin|idx\.npy)(\.tmp)?$")
_CHUNK_FILE = re.compile(r"^\d{5}\.json(\.tmp)?$")


@dataclass(frozen=True)
class PackOptions:
    text_field: str = "text"
    valid_fraction: float = 0.05
    seed: int = 1234
    on_bad_line: Literal["fail", "skip"] = "fail"
    max_doc_tokens: int | None = None  # content tokens (without bos/eos); None: no limit
    too_long: Literal["split", "truncate", "reject"] = "split"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    hf_split: str = "train"

    def check(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.on_bad_line not in ("fail", "skip"):
            raise ValueError(f"on_bad_line must be 'fail' or 'skip', got {self.on_bad_line!r}")
        if self.too_long not in ("split", "truncate", "reject"):
            raise ValueError(f"too_long must be 'split', 'truncate' or 'reject', got {self.too_long!r}")
        if self.max_doc_tokens is not None and self.max_doc_tokens <= 0:
            raise ValueError(f"max_doc_tokens must be > 0, got {self.max_doc_tokens}")
        if self.shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be > 0, got {self.shard_bytes}")


def _zero_counts() -> dict[str, Any]:
    return {
        "docs_in": 0,
        "docs": {s: 0 for s in SPLITS},  # input documents packed into each split
        "stored_docs": {s: 0 for s in SPLITS},  # documents as stored (a split document is several)
        "tokens": {s: 0 for s in SPLITS},
        "rejected": {k: 0 for k in REJECT_KINDS},
        "split_docs": 0,
        "truncated_docs": 0,
    }


def _add_counts(acc: dict[str, Any], c: dict[str, Any]) -> None:
    for k, v in c.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                acc[k][kk] += vv
        else:
            acc[k] += v


@dataclass
class PackSummary:
    output_dir: str
    sources: list[dict[str, Any]]  # the manifest entries of meta.json, counts included
    chunks: int = 0
    chunks_reused: int = 0
    bad_line_examples: list[str] = field(default_factory=list)  # the first few "file:line: reason"

    @property
    def docs_in(self) -> int:
        return sum(s["docs_in"] for s in self.sources)

    def docs(self, split: str) -> int:
        return sum(s["docs"][split] for s in self.sources)

    @property
    def tokens(self) -> dict[str, int]:
        return {sp: sum(s["tokens"][sp] for s in self.sources) for sp in SPLITS}

    @property
    def rejected(self) -> dict[str, int]:
        return {k: sum(s["rejected"][k] for s in self.sources) for k in REJECT_KINDS}

    def format(self) -> str:
        def reject_text(r: dict[str, int]) -> str:
            return ", ".join(f"{k} {r[k]}" for k in REJECT_KINDS)

        lines = [f"packed into {self.output_dir}: {self.chunks} chunks, {self.chunks_reused} reused from a prior run"]
        for s in self.sources:
            lines.append(
                f"  {s['path']}: {s['docs_in']} docs in -> train {s['docs']['train']}, valid {s['docs']['valid']}, "
                f"rejected {reject_text(s['rejected'])}"
            )
        rej = self.rejected
        lines.append(
            f"docs in {self.docs_in} = train {self.docs('train')} + valid {self.docs('valid')} "
            f"+ rejected {sum(rej.values())} ({reject_text(rej)})"
        )
        split_docs = sum(s["split_docs"] for s in self.sources)
        truncated = sum(s["truncated_docs"] for s in self.sources)
        if split_docs or truncated:
            lines.append(f"too long: {split_docs} docs split into pieces, {truncated} truncated")
        lines.append(f"tokens written (with bos/eos): train {self.tokens['train']:,}, valid {self.tokens['valid']:,}")
        lines += [f"  skipped {e}" for e in self.bad_line_examples]
        return "\n".join(lines)


# ---- worker side ---------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, out_dir: str, opts: PackOptions, key_base: str) -> None:
    _WORKER.update(tokenizer=tokenizer, out=Path(out_dir), opts=opts, key_base=key_base)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process


def _chunk_key(key_base: str, src: Source, block: Block) -> str:
    h = hashlib.sha256(f"{key_base}|{src.spec}|{src.format}|{block.first_line}|{block.truncated}|".encode())
    if isinstance(block.payload, bytes):
        h.update(block.payload)
    else:
        for v in block.payload:
            h.update(repr(v).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _intact(out: Path, done: dict[str, Any], itemsize: int) -> bool:
    for shard in done["shards"].values():
        if shard is None:
            continue
        b, i = out / shard["bin"], out / shard["idx"]
        if not (b.is_file() and i.is_file() and b.stat().st_size == shard["tokens"] * itemsize):
            return False
    return True


def _frame(docs: list[list[int]], bos: int, eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[bos] + ids + [eos] for each document, concatenated; and the stored lengths."""
    lens = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    n_content = int(lens.sum())
    stored = lens + 2
    ends = np.cumsum(stored)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    starts = ends - stored
    is_content = np.ones(len(flat), dtype=bool)
    is_content[starts] = is_content[ends - 1] = False
    flat[starts], flat[ends - 1] = bos, eos
    flat[is_content] = np.fromiter(chain.from_iterable(docs), dtype=dtype, count=n_content)
    return flat, stored


class _SplitFile:
    """The shard of one split of one chunk, appended batch by batch under a .tmp name."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.file: Any = None
        self.lengths: list[np.ndarray] = []

    def write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        if self.file is None:
            self.file = open(self.out / f"{self.name}.bin.tmp", "wb")  # noqa: SIM115 (spans calls)
        self.file.write(flat.tobytes())
        self.lengths.append(lengths)

    def commit(self) -> dict[str, Any] | None:
        if self.file is None:
            return None
        self.file.close()
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(self.lengths))])
        return commit_shard(self.out, self.name, offsets)


def _apply_length_policy(ids: list[int], opts: PackOptions) -> list[list[int]] | None:
    """The pieces one document is stored as, or None when it is rejected as too long."""
    n = opts.max_doc_tokens
    if n is None or len(ids) <= n:
        return [ids]
    if opts.too_long == "reject":
        return None
    if opts.too_long == "truncate":
        return [ids[:n]]
    return [ids[i : i + n] for i in range(0, len(ids), n)]


def _encode_batches(texts: list[str], lines: list[int]) -> Iterator[tuple[list[str], list[int]]]:
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= _ENCODE_CHARS:
            yield texts[start : i + 1], lines[start : i + 1]
            start, size = i + 1, 0
    if start < len(texts):
        yield texts[start:], lines[start:]


def _pack_chunk(chunk: int, src: Source, block: Block) -> dict[str, Any]:
    """Pack one chunk (in a worker): write its shards and marker; returns the marker's contents."""
    tok: Tokenizer = _WORKER["tokenizer"]
    out: Path = _WORKER["out"]
    opts: PackOptions = _WORKER["opts"]
    dtype = token_dtype(tok.vocab_size)
    key = _chunk_key(_WORKER["key_base"], src, block)
    marker = out / CHUNKS_DIR / f"{chunk:05d}.json"
    if marker.is_file():
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            done = {}
        if done.get("key") == key and _intact(out, done, dtype.itemsize):
            return {**done, "reused": True}

    counts = _zero_counts()
    rejects: list[dict[str, Any]] = []
    texts, lines = [], []
    for rec in parse_block(block, src.format, opts.text_field):
        counts["docs_in"] += 1
        if rec.text is None:
            if opts.on_bad_line == "fail":
                raise DataError(f"{src.spec}:{rec.line}: {rec.reason}")
            counts["rejected"][rec.kind] += 1
            rejects.append({"line": rec.line, "kind": rec.kind, "reason": rec.reason})
        elif not rec.text.strip():
            counts["rejected"]["empty"] += 1
            rejects.append({"line": rec.line, "kind": "empty", "reason": "empty or whitespace-only text"})
        else:
            texts.append(rec.text)
            lines.append(rec.line)

    files = {s: _SplitFile(out, shard_name(s, chunk)) for s in SPLITS}
    kill = faults.in_pack_chunk(chunk)  # fault injection (tests): crash mid-way through this chunk
    for batch, batch_lines in _encode_batches(texts, lines):
        is_valid = holdout_mask(opts.seed, block.source_index, np.asarray(batch_lines), opts.valid_fraction)
        pieces: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        for ids, line, valid in zip(tok.encode_batch(batch), batch_lines, is_valid):
            kept = _apply_length_policy(ids, opts)
            if kept is None:
                counts["rejected"]["too_long"] += 1
                reason = f"{len(ids)} tokens > max_doc_tokens {opts.max_doc_tokens}"
                rejects.append({"line": line, "kind": "too_long", "reason": reason})
                continue
            split = "valid" if valid else "train"
            counts["docs"][split] += 1
            counts["split_docs"] += len(kept) > 1
            counts["truncated_docs"] += opts.too_long == "truncate" and len(kept[0]) < len(ids)
            pieces[split] += kept
        for s in SPLITS:
            if pieces[s]:
                files[s].write(*_frame(pieces[s], tok.bos_id, tok.eos_id, dtype))
        if kill:  # a crash with a half-written shard, other chunks in any state
            for f in files.values():
                if f.file is not None:
                    f.file.flush()
            faults.kill_process_group()
    shards = {s: files[s].commit() for s in SPLITS}
    for s, shard in shards.items():
        counts["stored_docs"][s] = shard["docs"] if shard else 0
        counts["tokens"][s] = shard["tokens"] if shard else 0
    done = {"key": key, "source_index": block.source_index, "first_line": block.first_line}
    done.update(counts=counts, shards=shards, rejects=rejects)
    (out / CHUNKS_DIR).mkdir(exist_ok=True)
    atomic_json(marker, done)
    return {**done, "reused": False}


def _pack_task(task: tuple[int, Source, Block]) -> dict[str, Any]:
    return _pack_chunk(*task)


# ---- main process ---------------------------------------------------------------------------------------


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_entry(src: Source) -> dict[str, Any]:
    is_local = not src.spec.startswith("hf:")
    entry = {
        "path": str(Path(src.spec).resolve()) if is_local else src.spec,
        "format": src.format,
        "compression": src.compression,
        "bytes": os.path.getsize(src.spec) if src.is_file else None,
        "sha256": None,  # filled in while reading (files only)
    }
    entry.update(_zero_counts())
    return entry


def _tasks(sources: list[Source], opts: PackOptions, manifest: list[dict[str, Any]]) -> Iterator[tuple]:
    chunk = 0
    for i, src in enumerate(sources):
        hasher = hashlib.sha256() if src.format in ("jsonl", "txt") else None
        for block in iter_blocks(i, src, opts.text_field, opts.shard_bytes, opts.hf_split, hasher):
            yield chunk, src, block
            chunk += 1
        if hasher is not None:
            manifest[i]["sha256"] = hasher.hexdigest()
        elif src.format == "parquet":
            manifest[i]["sha256"] = _file_sha256(src.spec)


def _run_chunks(tasks: Iterator[tuple], num_proc: int, initargs: tuple) -> Iterator[dict[str, Any]]:
    """Chunk results in input order, with at most 2 * num_proc chunks in flight."""
    if num_proc <= 1:
        _init_worker(*initargs)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # in-process: keep Ctrl-C working
        yield from map(_pack_task, tasks)
        return
    with mp.get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_pack_task, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def pack(
    inputs: Sequence[str | os.PathLike],
    tokenizer_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_proc: int = 1,
    progress: bool = True,
    **options: Any,
) -> PackSummary:
    """Tokenize `inputs` into a packed directory (see docs/data.md); `options` are PackOptions fields."""
    opts = PackOptions(**options)
    opts.check()
    if not inputs:
        raise ValueError("no inputs")
    sources = [detect_source(p) for p in inputs]
    tokenizer = Tokenizer(tokenizer_path)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / CHUNKS_DIR).mkdir(exist_ok=True)
    # Invalidate an older packing first: without meta.json the directory reads as incomplete.
    (out / META_FILE).unlink(missing_ok=True)

    manifest = [_manifest_entry(s) for s in sources]
    key_base = json.dumps({"tokenizer": tokenizer.sha256, "options": asdict(opts)}, sort_keys=True)
    summary = PackSummary(str(out), manifest)
    split_shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    bar = tqdm(desc="pack", unit="doc", disable=not progress)
    rejects_tmp = out / (REJECTS_FILE + ".tmp")
    with rejects_tmp.open("w", encoding="utf-8") as rejects_file:
        for done in _run_chunks(_tasks(sources, opts, manifest), num_proc, (tokenizer, str(out), opts, key_base)):
            src_i = done["source_index"]
            _add_counts(manifest[src_i], done["counts"])
            summary.chunks += 1
            summary.chunks_reused += done["reused"]
            for s in SPLITS:
                if done["shards"][s] is not None:
                    split_shards[s].append(done["shards"][s])
            for r in done["rejects"]:
                rejects_file.write(json.dumps({"source": manifest[src_i]["path"], **r}, ensure_ascii=False) + "\n")
                if r["kind"] in ("bad_line", "undecodable") and len(summary.bad_line_examples) < 5:
                    summary.bad_line_examples.append(f"{sources[src_i].spec}:{r['line']}: {r['reason']}")
            bar.update(done["counts"]["docs_in"])
            bar.set_postfix(tokens=f"{sum(done['counts']['tokens'].values()):,}", refresh=False)
    bar.close()

    packed = summary.docs("train") + summary.docs("valid")
    if summary.docs_in != packed + sum(summary.rejected.values()):
        raise AssertionError(f"document counts do not reconcile:\n{summary.format()}")  # a bug here
    if packed == 0:
        rejects_tmp.unlink()
        raise DataError(f"no documents left to pack in {[s.spec for s in sources]} (all rejected)")
    keep = {x[k] for shards in split_shards.values() for x in shards for k in ("bin", "idx")}
    _remove_stale(out, summary.chunks, keep)
    os.replace(rejects_tmp, out / REJECTS_FILE)
    write_meta(out, _meta(tokenizer, opts, split_shards, summary))
    return summary


def _remove_stale(out: Path, n_chunks: int, keep: set[str]) -> None:
    """Delete leftovers of crashed or older packings: shards not in this run's meta, markers past its chunks."""
    for f in out.iterdir():
        if _SHARD_FILE.match(f.name) and f.name not in keep:
            f.unlink()
    for f in (out / CHUNKS_DIR).iterdir():
        if _CHUNK_FILE.match(f.name) and (f.name.endswith(".tmp") or int(f.name[:5]) >= n_chunks):
            f.unlink()


def _meta(
    tokenizer: Tokenizer, opts: PackOptions, split_shards: dict[str, list[dict[str, Any]]], summary: PackSummary
) -> dict[str, Any]:
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {
        s: {
            "num_tokens": sum(x["tokens"] for x in shards),
            "num_docs": sum(x["docs"] for x in shards),
            "shards": shards,
        }
        for s, shards in split_shards.items()
    }
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
        "text_field": opts.text_field,
        "valid_fraction": opts.valid_fraction,
        "seed": opts.seed,
        "options": asdict(opts),
        "splits": splits,
        "docs_in": summary.docs_in,
        "docs_packed": {s: summary.docs(s) for s in SPLITS},
        "rejected": summary.rejected,
        "chunks": summary.chunks,
        "sources": summary.sources,
    }
