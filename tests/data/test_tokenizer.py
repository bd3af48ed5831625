"""Tokenizer training and wrapping, on the bundled tiny EN/JA corpora (real sentencepiece, no mocks)."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from data_prep import train_tokenizer as train_cli
from fm_pretrain.data import DataError
from fm_pretrain.data.jsonl import iter_jsonl
from fm_pretrain.data.tokenizer import Tokenizer, iter_sentences, train_tokenizer
from tests.helpers.paths import REPO  # noqa: E402

TINY = [REPO / "data/tiny/tiny_en.jsonl", REPO / "data/tiny/tiny_ja.jsonl"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    # BPE at 2000 trains in well under a second; below ~1200 JA's character coverage does not fit.
    return train_tokenizer(TINY, tmp_path_factory.mktemp("tok") / "tok", vocab_size=2000, model_type="bpe")


def test_trained_model_properties(tok: Tokenizer) -> None:
    assert Path(tok.path).is_file() and Path(tok.path).with_suffix(".vocab").is_file()
    assert tok.vocab_size == 2000
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.sha256 == hashlib.sha256(Path(tok.path).read_bytes()).hexdigest()
    assert tok.encode_batch(["1234"]) == [tok.encode("1234")]
    assert len(tok.encode("1234")) >= 4  # split_digits: one piece per digit


@pytest.mark.parametrize("path", TINY, ids=["en", "ja"])
def test_round_trip_is_lossless(tok: Tokenizer, path: Path) -> None:
    texts = [text for _, text in iter_jsonl(path)]
    ids = tok.encode_batch(texts)
    assert [tok.decode(x) for x in ids] == texts
    assert all(0 <= i < tok.vocab_size for x in ids for i in x)
    assert tok.unk_id not in {i for x in ids for i in x}  # byte fallback instead of <unk>


def test_unseen_characters_use_byte_fallback(tok: Tokenizer) -> None:
    text = "Ωμέγα 🦊 ＡＢＣ\ttab\r\n  two  spaces \n\n"
    assert tok.decode(tok.encode(text)) == text


def test_pickle_carries_the_model(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256
    assert clone.encode("日本語 and English") == tok.encode("日本語 and English")


def test_unigram_trains(tmp_path: Path) -> None:
    tok = train_tokenizer(TINY, tmp_path / "uni", vocab_size=2000, model_type="unigram", max_sentences=2000)
    text = "Anarchism は政治哲学です。"
    assert tok.vocab_size == 2000 and tok.decode(tok.encode(text)) == text


def test_missing_model_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.model")):
        Tokenizer(tmp_path / "nope.model")


def test_missing_input_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train_tokenizer([TINY[0], tmp_path / "missing.jsonl"], tmp_path / "t", vocab_size=2000)


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: missing field 'text'"):
        train_tokenizer([bad], tmp_path / "t", vocab_size=2000)


def test_sentences_split_lines_and_chunk_long_ones(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "one\n\n  \ntwo\n" + "x" * 25}) + "\n")
    assert list(iter_sentences([f], chunk_chars=10)) == ["one", "two"] + ["x" * 10] * 2 + ["x" * 5]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "cli" / "tok"
    argv = ["--input", *map(str, TINY), "--output-prefix", str(prefix), "--vocab-size", "2000"]
    assert train_cli.main([*argv, "--model-type", "bpe"]) == 0
    out = capsys.readouterr().out
    assert "vocab size 2000" in out
    assert out.count("chars/token") == 2 and "tiny_ja.jsonl" in out
    assert Path(f"{prefix}.model").is_file()
    assert train_cli.main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(prefix)]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_weighted_reservoir_sample_card_and_reserved_ids(tmp_path: Path) -> None:
    """Inputs sampled by weight (reservoir, streamed), held-out docs measured per language, reserved ids."""
    import gzip

    ja_gz = tmp_path / "ja.jsonl.gz"
    ja_gz.write_bytes(gzip.compress(TINY[1].read_bytes()))  # compressed inputs are streamed too
    prefix = tmp_path / "w" / "tok"
    tok = train_tokenizer(
        [TINY[0], ja_gz],
        prefix,
        vocab_size=2000,
        model_type="bpe",
        max_sentences=300,
        weights=[1, 3],
        langs=["en", "ja"],
        reserved_tokens=3,
        heldout_fraction=0.2,
    )
    card = json.loads(Path(f"{prefix}.card.json").read_text())
    en, ja = card["training_sample"]
    assert (en["sample_size"], ja["sample_size"]) == (75, 225)
    assert en["lines_sampled"] == 75 < en["lines_seen"] and ja["lines_sampled"] == 225 < ja["lines_seen"]
    assert en["heldout_docs"] > 0 and ja["heldout_docs"] > 0
    assert en["docs_seen"] == 20 and ja["docs_seen"] == 40
    for lang in ("en", "ja"):
        h = card["heldout"][lang]
        assert h["chars_per_token"] == round(h["chars"] / h["tokens"], 4) and h["tokens"] > 0
    assert card["vocab_size"] == tok.vocab_size == 2000 and card["sha256"] == tok.sha256
    assert card["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert card["reserved_ids"] == {"<reserved_0>": 4, "<reserved_1>": 5, "<reserved_2>": 6}
    assert 5 in tok.encode("x <reserved_1> y")  # a user-defined piece: never split
    assert card["options"]["character_coverage"] == 0.9995
    # Same seed, same sample and model; held-out documents are not in the training sample.
    again = train_tokenizer(
        [TINY[0], ja_gz], tmp_path / "w2" / "tok", 2000, "bpe", max_sentences=300, weights=[1, 3],
        langs=["en", "ja"], reserved_tokens=3, heldout_fraction=0.2,
    )  # fmt: skip
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert [again.id_to_piece(i) for i in range(again.vocab_size)] == pieces  # the proto also holds the path
