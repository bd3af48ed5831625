"""Input sources for packing and tokenizer training, streamed in blocks that never hold a corpus in RAM.

A source is a JSONL file (plain, .gz or .zst), a plain-text file (.txt, .txt.gz, .txt.zst: one document
per non-blank line), a parquet file, or a Hugging Face `datasets` dataset (`hf:NAME` from the hub, a
directory written by `save_to_disk`, or any local path `datasets.load_dataset` understands).

Reading is split in two so that the expensive half runs in worker processes:
  * `iter_blocks` (cheap, in the main process): cuts a source into `Block`s of about `block_bytes`
    at line boundaries, with the 1-based number of their first line (row, for parquet and datasets);
  * `parse_block` (in a worker): turns a block into `Record`s, one per document, each either a text
    or a rejection reason. `iter_documents` chains both for serial use.
A compressed stream that ends early yields everything that decompressed, then one "undecodable" record
at the line after the last complete one.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fm_pretrain.data import DataError

Format = Literal["jsonl", "txt", "parquet", "hf"]
BAD_KINDS = ("bad_line", "undecodable")  # malformed records: fail or skip by --on-bad-line
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Source:
    spec: str  # as given by the user (a path or hf:NAME)
    format: Format
    compression: Literal["", "gz", "zst"] = ""

    @property
    def is_file(self) -> bool:
        return self.format in ("jsonl", "txt", "parquet")


@dataclass
class Block:
    source_index: int
    first_line: int  # 1-based line (or row) number of the first record
    kind: Literal["lines", "values"]  # raw lines to parse, or already extracted field values
    payload: bytes | list[Any]
    truncated: bool = False  # the compressed stream ended early right after this block

    @property
    def nbytes(self) -> int:
        return len(self.payload) if isinstance(self.payload, bytes) else sum(len(str(v)) for v in self.payload)


@dataclass
class Record:
    line: int
    text: str | None  # None when rejected as malformed
    kind: str = ""  # "", "bad_line" or "undecodable"
    reason: str = ""


def detect_source(spec: str | os.PathLike) -> Source:
    """The format of an input from its name; raises FileNotFoundError naming a missing local path."""
    spec = os.fspath(spec)
    if spec.startswith("hf:"):
        return Source(spec, "hf")
    path = Path(spec)
    if path.is_dir():
        return Source(spec, "hf")
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {spec}")
    name = path.name.lower()
    compression: Literal["", "gz", "zst"] = ""
    for ext in ("gz", "zst"):
        if name.endswith("." + ext):
            compression, name = ext, name[: -len(ext) - 1]  # type: ignore[assignment]
    if name.endswith(".parquet"):
        if compression:
            raise DataError(f"{spec}: compressed parquet files are not supported (parquet compresses internally)")
        return Source(spec, "parquet")
    if name.endswith(".txt"):
        return Source(spec, "txt", compression)
    return Source(spec, "jsonl", compression)  # .jsonl, .json, .ndjson and anything else line-delimited


class _Truncated(Exception):
    """The compressed stream ended before its end marker."""


def _raw_chunks(f: Any, hasher: Any, read_bytes: int) -> Iterator[bytes]:
    for raw in iter(lambda: f.read(read_bytes), b""):
        if hasher is not None:
            hasher.update(raw)
        yield raw


def _decompressed_chunks(
    path: str, compression: str, hasher: Any = None, read_bytes: int = _READ_BYTES
) -> Iterator[bytes]:
    """Bytes of a (possibly compressed, possibly multi-member) file; raises _Truncated after the last byte.

    `hasher` (a hashlib object), if given, sees the file's raw bytes: the source manifest's sha256 costs
    no second read.
    """
    with open(path, "rb") as f:
        if not compression:
            yield from _raw_chunks(f, hasher, read_bytes)
            return
        new = (lambda: zlib.decompressobj(wbits=47)) if compression == "gz" else _zstd_decompressobj
        d, started = new(), False
        for raw in _raw_chunks(f, hasher, read_bytes):
            while raw:
                started = True
                try:
                    out = d.decompress(raw)
                except Exception as e:  # zlib.error, or zstandard's ZstdError
                    raise DataError(f"{path}: corrupt {compression} stream ({e})") from e
                if out:
                    yield out
                raw = d.unused_data if d.eof else b""
                if d.eof:
                    d, started = new(), bool(raw)
        if started and not d.eof:
            raise _Truncated


def _zstd_decompressobj() -> Any:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _line_blocks(source_index: int, src: Source, block_bytes: int, hasher: Any) -> Iterator[Block]:
    pending = bytearray()  # decompressed bytes not yet in a block
    line = 1

    def cut(final: bool) -> Iterator[Block]:
        nonlocal line
        while len(pending) >= block_bytes or (final and pending):
            end = pending.find(b"\n", block_bytes - 1) + 1 if len(pending) >= block_bytes else 0
            if not end:
                if not final:
                    return  # the block's last line is not complete yet
                end = len(pending)
            blob = bytes(pending[:end])
            del pending[:end]
            if not blob.endswith(b"\n"):
                blob += b"\n"  # a last line without a newline is a line
            yield Block(source_index, line, "lines", blob)
            line += blob.count(b"\n")

    try:
        for chunk in _decompressed_chunks(src.spec, src.compression, hasher, min(_READ_BYTES, block_bytes)):
            pending += chunk
            yield from cut(final=False)
    except _Truncated:
        # Complete lines are documents; the partial line (if any) is part of the truncated record.
        complete = pending.rfind(b"\n") + 1
        del pending[complete:]
        blocks = list(cut(final=True)) or [Block(source_index, line, "lines", b"")]
        blocks[-1].truncated = True
        yield from blocks
        return
    yield from cut(final=True)


def _parquet_blocks(source_index: int, src: Source, text_field: str, block_bytes: int) -> Iterator[Block]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src.spec)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{src.spec}: no column {text_field!r} (columns: {names[:20]})")
    columns = (b.column(0).to_pylist() for b in pf.iter_batches(1024, columns=[text_field]))
    return _value_blocks(source_index, columns, block_bytes)


def open_hf_dataset(spec: str, split: str = "train") -> Any:
    """A datasets.Dataset / IterableDataset for `hf:NAME`, a save_to_disk directory, or a local dataset path."""
    import datasets

    if spec.startswith("hf:"):
        return datasets.load_dataset(spec[3:], split=split, streaming=True)
    if (Path(spec) / "dataset_info.json").is_file() or (Path(spec) / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{spec}: no split {split!r} (have {sorted(ds)})")
            ds = ds[split]
        return ds
    return datasets.load_dataset(spec, split=split, streaming=True)


def _hf_blocks(source_index: int, src: Source, text_field: str, block_bytes: int, split: str) -> Iterator[Block]:
    ds = open_hf_dataset(src.spec, split)
    names = ds.column_names
    if names is not None and text_field not in names:
        raise DataError(f"{src.spec}: no column {text_field!r} (columns: {names[:20]})")

    def columns() -> Iterator[list[Any]]:
        for i, batch in enumerate(ds.iter(batch_size=1024)):
            if text_field not in batch:
                where = f"{src.spec}:{i * 1024 + 1}"
                raise DataError(f"{where}: no column {text_field!r} (columns: {sorted(batch)[:20]})")
            yield list(batch[text_field])

    return _value_blocks(source_index, columns(), block_bytes)


def _value_blocks(source_index: int, columns: Iterator[list[Any]], block_bytes: int) -> Iterator[Block]:
    """Blocks of already extracted field values (parquet, datasets), about `block_bytes` of text each."""
    row, values, size = 1, [], 0
    for col in columns:
        for v in col:
            values.append(v)
            size += len(v) if isinstance(v, str) else 0
            if size >= block_bytes:
                yield Block(source_index, row, "values", values)
                row, values, size = row + len(values), [], 0
    if values:
        yield Block(source_index, row, "values", values)


def iter_blocks(
    source_index: int, src: Source, text_field: str, block_bytes: int, hf_split: str = "train", hasher: Any = None
) -> Iterator[Block]:
    """Consecutive blocks of one source, each about `block_bytes` of text, cut at line boundaries.

    `hasher`: updated with the raw bytes of a JSONL/text file as they are read (ignored for other formats).
    """
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    if src.format in ("jsonl", "txt"):
        return _line_blocks(source_index, src, block_bytes, hasher)
    if src.format == "parquet":
        return _parquet_blocks(source_index, src, text_field, block_bytes)
    return _hf_blocks(source_index, src, text_field, block_bytes, hf_split)


def parse_json_line(raw: bytes, text_field: str) -> Record:
    """One JSONL line as a Record (line number 0: the caller sets it)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Record(0, None, "undecodable", f"not valid UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return Record(0, None, "bad_line", f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return Record(0, None, "bad_line", f"expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        return Record(0, None, "bad_line", f"missing field {text_field!r} (keys: {sorted(obj)[:10]})")
    return _value_record(obj[text_field], text_field)


def _value_record(value: Any, text_field: str) -> Record:
    if not isinstance(value, str):
        return Record(0, None, "bad_line", f"field {text_field!r} is {type(value).__name__}, expected a string")
    return Record(0, value)


def _txt_record(raw: bytes) -> Record:
    try:
        return Record(0, raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Record(0, None, "undecodable", f"not valid UTF-8 ({e.reason} at byte {e.start})")


def parse_block(block: Block, fmt: Format, text_field: str) -> list[Record]:
    """The documents of a block, in order; blank lines are not documents (but are counted as lines)."""
    records = []
    if block.kind == "values":
        for i, value in enumerate(block.payload):  # type: ignore[arg-type]
            rec = _value_record(value, text_field)
            rec.line = block.first_line + i
            records.append(rec)
        return records
    assert isinstance(block.payload, bytes)
    lines = block.payload.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for i, raw in enumerate(lines):
        if fmt == "jsonl" and not raw.strip():
            continue
        if fmt == "txt":
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                continue
        rec = parse_json_line(raw, text_field) if fmt == "jsonl" else _txt_record(raw)
        rec.line = block.first_line + i
        records.append(rec)
    if block.truncated:
        records.append(
            Record(block.first_line + len(lines), None, "undecodable", "compressed stream ends early (truncated file)")
        )
    return records


def holdout_mask(seed: int, source_index: int, lines: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are held out: a seeded hash of (seed, source, line) below `fraction`.

    A function of each document's own position, so it does not depend on how the input is cut into
    chunks, on the number of workers, or on any other document: it can be decided while streaming.
    """
    u = np.uint64
    base = np.array([((seed & 0xFFFFFFFF) << 32) ^ (source_index & 0xFFFFFFFF)], dtype=u)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 on purpose
        x = np.asarray(lines, dtype=u) * u(0x9E3779B97F4A7C15) + base * u(0xD1B54A32D192ED03)
        # splitmix64 finalizer: a well-mixed 64-bit value, then its top 53 bits as a uniform in [0, 1)
        x = (x ^ (x >> u(30))) * u(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> u(27))) * u(0x94D049BB133111EB)
        x = x ^ (x >> u(31))
    return (x >> u(11)).astype(np.float64) * 2.0**-53 < fraction


def iter_documents(
    spec: str | os.PathLike | Source,
    text_field: str = "text",
    on_bad_line: Callable[[int, str, str], None] | None = None,
    hf_split: str = "train",
) -> Iterator[tuple[int, str]]:
    """Yield `(line, text)` for each document of one source, streamed.

    A malformed record raises DataError("{path}:{line}: reason"), or is passed to `on_bad_line(line, kind,
    reason)` and skipped. Empty texts are yielded: rejecting them is the caller's policy.
    """
    src = spec if isinstance(spec, Source) else detect_source(spec)
    for block in iter_blocks(0, src, text_field, 4 << 20, hf_split):
        for rec in parse_block(block, src.format, text_field):
            if rec.text is not None:
                yield rec.line, rec.text
            elif on_bad_line is None:
                raise DataError(f"{src.spec}:{rec.line}: {rec.reason}")
            else:
                on_bad_line(rec.line, rec.kind, rec.reason)
