"""SentencePiece tokenizer: a thin wrapper with fixed special ids, and training on weighted samples of corpora.

Special ids are fixed for every model trained here: pad=0, unk=1, bos=2, eos=3, then the optional
reserved ids `<reserved_0>`...; training uses `identity` normalization and keeps whitespace, and "\\n"
is a piece of its own, so that `decode(encode(text)) == text` for any text (byte fallback covers
characters outside the vocabulary).

Training streams each input once and keeps a seeded reservoir sample of its lines, sized by the input's
weight, so inputs larger than memory are fine; documents picked by a seeded hash are held out of
training and measure characters per token for the card (`{prefix}.card.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm

from fm_pretrain.data.readers import detect_source, holdout_mask, iter_documents

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


def _lines(text: str, chunk_chars: int) -> Iterator[str]:
    for line in text.splitlines():
        if line.strip():
            for i in range(0, len(line), chunk_chars):
                yield line[i : i + chunk_chars]


def iter_sentences(
    inputs: Sequence[str | os.PathLike], text_field: str = "text", chunk_chars: int = _CHUNK_CHARS
) -> Iterator[str]:
    """Non-empty lines of every document, streamed; lines over `chunk_chars` are cut into chunks."""
    for path in inputs:
        for _, text in iter_documents(path, text_field):
            yield from _lines(text, chunk_chars)


@dataclass
class InputSample:
    """What training saw of one input, and what its held-out documents measured."""

    path: str
    lang: str
    weight: float
    sample_size: int  # reservoir capacity (lines)
    lines_seen: int = 0
    lines_sampled: int = 0
    docs_seen: int = 0
    heldout_docs: int = 0
    heldout_chars: int = 0
    heldout_texts: list[str] = field(default_factory=list, repr=False)


def sample_input(
    index: int,
    path: str | os.PathLike,
    text_field: str,
    sample_size: int,
    seed: int,
    heldout_fraction: float,
    heldout_max_chars: int,
    info: InputSample,
) -> list[str]:
    """A uniform reservoir sample (algorithm R) of the lines of one input, streamed once.

    Documents whose seeded hash falls under `heldout_fraction` are not trained on; up to
    `heldout_max_chars` of them are kept in `info.heldout_texts` for measuring.
    """
    rng = random.Random(seed * 1_000_003 + index)
    reservoir: list[str] = []
    for line_no, text in iter_documents(path, text_field):
        info.docs_seen += 1
        if heldout_fraction > 0 and holdout_mask(seed, index, np.array([line_no]), heldout_fraction)[0]:
            info.heldout_docs += 1
            if info.heldout_chars < heldout_max_chars:
                info.heldout_texts.append(text)
                info.heldout_chars += len(text)
            continue
        for sentence in _lines(text, _CHUNK_CHARS):
            info.lines_seen += 1
            if len(reservoir) < sample_size:
                reservoir.append(sentence)
            else:
                j = rng.randrange(info.lines_seen)
                if j < sample_size:
                    reservoir[j] = sentence
    info.lines_sampled = len(reservoir)
    return reservoir


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
    weights: Sequence[float] | None = None,
    langs: Sequence[str] | None = None,
    reserved_tokens: int = 0,
    character_coverage: float = 0.9995,
    heldout_fraction: float = 0.05,
    heldout_max_chars: int = 2_000_000,
) -> Tokenizer:
    """Train a sentencepiece model on a weighted sample of the inputs' lines; writes `{prefix}.model/.vocab/.card.json`.

    Input i contributes a reservoir sample of `max_sentences * weights[i] / sum(weights)` lines (all its
    lines when it has fewer). Inputs are any format readers.detect_source knows (JSONL, .gz, .zst,
    parquet, text, datasets). Bad lines raise DataError naming file:line. Returns the trained Tokenizer.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    paths = [os.fspath(p) for p in inputs]
    for p in paths:
        detect_source(p)  # FileNotFoundError naming a missing input before any work
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    langs = list(langs) if langs is not None else [Path(p).name.split(".")[0] for p in paths]
    if len(weights) != len(paths) or len(langs) != len(paths):
        raise ValueError(f"{len(paths)} inputs but {len(weights)} weights and {len(langs)} languages")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be > 0, got {weights}")
    if reserved_tokens < 0:
        raise ValueError(f"reserved_tokens must be >= 0, got {reserved_tokens}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    samples, sentences = [], []
    for i, (p, w, lang) in enumerate(zip(paths, weights, langs)):
        info = InputSample(p, lang, w, max(1, round(max_sentences * w / sum(weights))))
        sentences += sample_input(i, p, text_field, info.sample_size, seed, heldout_fraction, heldout_max_chars, info)
        samples.append(info)
    random.Random(seed).shuffle(sentences)  # interleave the inputs
    spm.set_random_generator_seed(seed)
    reserved = [f"<reserved_{k}>" for k in range(reserved_tokens)]
    n = len(sentences)
    _train(iter(sentences), prefix, vocab_size, model_type, n, num_threads, verbose, reserved, character_coverage)
    tok = Tokenizer(f"{prefix}.model")
    write_card(tok, samples, prefix.with_name(prefix.name + ".card.json"), model_type, character_coverage, reserved)
    return tok


def _train(
    sentences: Iterator[str],
    prefix: Path,
    vocab_size: int,
    model_type: str,
    max_sentences: int,
    num_threads: int | None,
    verbose: bool,
    reserved: list[str],
    character_coverage: float,
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        split_digits=True,
        character_coverage=character_coverage,  # 0.9995 keeps the long tail of CJK characters as pieces
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # Lossless: no NFKC, whitespace kept, newline a piece (lines are split for training, so
        # without this it would only be reachable through byte fallback). Reserved ids come first.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=[*reserved, "\n"],
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=max(max_sentences, 1),
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )


def write_card(
    tok: Tokenizer,
    samples: list[InputSample],
    path: Path,
    model_type: str,
    character_coverage: float,
    reserved: list[str],
) -> dict[str, Any]:
    """The tokenizer card: vocabulary, special ids, training sample, chars/token per language on held-out text."""
    per_lang: dict[str, dict[str, Any]] = {}
    for s in samples:
        n_tokens = sum(len(ids) for ids in tok.encode_batch(s.heldout_texts)) if s.heldout_texts else 0
        agg = per_lang.setdefault(s.lang, {"heldout_docs": 0, "chars": 0, "tokens": 0})
        agg["heldout_docs"] += len(s.heldout_texts)
        agg["chars"] += s.heldout_chars
        agg["tokens"] += n_tokens
    for agg in per_lang.values():
        agg["chars_per_token"] = round(agg["chars"] / agg["tokens"], 4) if agg["tokens"] else None
    card = {
        "model": Path(tok.path).name,
        "sha256": tok.sha256,
        "model_type": model_type,
        "vocab_size": tok.vocab_size,
        "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id},
        "reserved_ids": {p: tok.sp.piece_to_id(p) for p in reserved},
        "newline_id": tok.sp.piece_to_id("\n"),
        "options": {
            "byte_fallback": True,
            "split_digits": True,
            "character_coverage": character_coverage,
            "normalization": "identity",
        },
        "training_sample": [{k: v for k, v in asdict(s).items() if k != "heldout_texts"} for s in samples],
        "heldout": per_lang,
    }
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return card


def chars_per_token(
    tokenizer: Tokenizer, path: str | os.PathLike, text_field: str = "text", batch_docs: int = 256
) -> tuple[int, int]:
    """(characters, tokens) over all documents of an input; bos/eos not counted."""
    n_chars = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for _, text in iter_documents(path, text_field):
        n_chars += len(text)
        batch.append(text)
        if len(batch) >= batch_docs:
            flush()
    flush()
    return n_chars, n_tokens
