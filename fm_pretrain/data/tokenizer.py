"""SentencePiece tokenizer: a thin wrapper with fixed special ids, and training from JSONL corpora.

Special ids are fixed for every model trained here: pad=0, unk=1, bos=2, eos=3. Training uses
`identity` normalization and keeps whitespace, and "\\n" is a piece of its own, so that
`decode(encode(text)) == text` for any text (byte fallback covers characters outside the vocabulary).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from fm_pretrain.data.jsonl import iter_jsonl

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# sentencepiece drops (with a warning) training sentences longer than max_sentence_length bytes:
# cut long lines into chunks that fit even at 4 bytes per character.
_MAX_SENTENCE_BYTES = 16384
_CHUNK_CHARS = _MAX_SENTENCE_BYTES // 4


class Tokenizer:
    """A loaded sentencepiece model. Picklable (carries the model bytes), so it can go to worker processes."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self._init(str(path), path.read_bytes())

    def _init(self, path: str, proto: bytes) -> None:
        self.path = path
        self._proto = proto
        # Load from the same bytes that are hashed, so sha256 always describes the model in use.
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.sha256 = hashlib.sha256(proto).hexdigest()

    def __getstate__(self) -> dict:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._init(state["path"], state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without bos/eos."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text, without bos/eos."""
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def iter_sentences(
    inputs: Sequence[str | os.PathLike], text_field: str = "text", chunk_chars: int = _CHUNK_CHARS
) -> Iterator[str]:
    """Non-empty lines of every document, streamed; lines over `chunk_chars` are cut into chunks."""
    for path in inputs:
        for _, text in iter_jsonl(path, text_field):
            for line in text.splitlines():
                if not line.strip():
                    continue
                for i in range(0, len(line), chunk_chars):
                    yield line[i : i + chunk_chars]


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: Literal["unigram", "bpe"] = "unigram",
    text_field: str = "text",
    max_sentences: int = 2_000_000,
    seed: int = 1234,
    num_threads: int | None = None,
    verbose: bool = False,
) -> Tokenizer:
    """Train a sentencepiece model on the lines of JSONL documents; writes `{model_prefix}.model/.vocab`.

    `max_sentences` caps the lines sentencepiece keeps (a seeded random sample when there are more).
    Bad JSONL lines raise DataError naming file:line. Returns the trained Tokenizer.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Seeds the sentence sampling (input_sentence_size) and any other randomness in training.
    spm.set_random_generator_seed(seed)
    # sentencepiece turns an exception raised by the iterator into an opaque RuntimeError: keep the
    # original (a DataError naming file:line) and raise that instead.
    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        try:
            yield from iter_sentences(inputs, text_field)
        except Exception as e:
            failure.append(e)
            raise

    try:
        _train(sentences(), prefix, vocab_size, model_type, max_sentences, num_threads, verbose)
    except RuntimeError as e:
        if failure:
            raise failure[0] from e
        raise
    return Tokenizer(f"{prefix}.model")


def _train(
    sentences: Iterator[str],
    prefix: Path,
    vocab_size: int,
    model_type: str,
    max_sentences: int,
    num_threads: int | None,
    verbose: bool,
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,  # keeps the long tail of CJK characters as pieces
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # Lossless: no NFKC, whitespace kept, newline a piece (lines are split for training, so
        # without this it would only be reachable through byte fallback).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )


def chars_per_token(
    tokenizer: Tokenizer, path: str | os.PathLike, text_field: str = "text", batch_docs: int = 256
) -> tuple[int, int]:
    """(characters, tokens) over all documents of a JSONL file; bos/eos not counted."""
    n_chars = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for _, text in iter_jsonl(path, text_field):
        n_chars += len(text)
        batch.append(text)
        if len(batch) >= batch_docs:
            flush()
    flush()
    return n_chars, n_tokens
