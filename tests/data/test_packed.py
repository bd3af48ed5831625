"""Packing JSONL into shards and reading them back (real sentencepiece + datasets, no mocks)."""

from __future__ import annotations

import os

# Before anything imports datasets: never probe the network (PLATFORM_NOTES, sentencepiece + datasets).
for _var, _val in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_UPDATE_DOWNLOAD_COUNTS", "0")):
    os.environ.setdefault(_var, _val)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from data_prep import pack as pack_cli  # noqa: E402
from fm_pretrain.data import DataError  # noqa: E402
from fm_pretrain.data.jsonl import iter_jsonl  # noqa: E402
from fm_pretrain.data.pack import PackSummary, pack  # noqa: E402
from fm_pretrain.data.packed import (  # noqa: E402
    IGNORE_INDEX,
    GlobalSampler,
    PackedDataset,
    micro_batches,
    read_meta,
    token_dtype,
)
from fm_pretrain.data.readers import holdout_mask  # noqa: E402
from fm_pretrain.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from tests.helpers.paths import REPO  # noqa: E402

TINY = [REPO / "data/tiny/tiny_en.jsonl", REPO / "data/tiny/tiny_ja.jsonl"]
CORPUS = Path("/work/shared/data/corpus")
SEED = 7


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(TINY, tmp_path_factory.mktemp("tok") / "tok", vocab_size=2000, model_type="bpe")


@pytest.fixture(scope="module")
def packed(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PackSummary]:
    out = tmp_path_factory.mktemp("packed")
    # Small shards so that documents and samples cross shard boundaries.
    summary = pack(TINY, tok.path, out, valid_fraction=0.1, shard_bytes=8000, seed=SEED, progress=False)
    return out, summary


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _shard_docs(data_dir: Path, split: str) -> list[np.ndarray]:
    """Every stored document of a split, in order, read straight from the files (not via PackedDataset)."""
    meta = read_meta(data_dir)
    docs = []
    for shard in meta["splits"][split]["shards"]:
        tokens = np.fromfile(data_dir / shard["bin"], dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
        idx = np.load(data_dir / shard["idx"])
        docs += [tokens[a:b].astype(np.int64) for a, b in zip(idx[:-1], idx[1:])]
    return docs


def ds_valid_docs(data_dir: Path) -> int:
    return read_meta(data_dir)["splits"]["valid"]["num_docs"]


# --- packing -----------------------------------------------------------------------------------------


def test_round_trip_en_and_ja(packed: tuple[Path, PackSummary], tok: Tokenizer) -> None:
    out, _ = packed
    docs = [(i, line, t) for i, p in enumerate(TINY) for line, t in iter_jsonl(p)]
    texts = [t for *_, t in docs]
    is_valid = np.array([holdout_mask(SEED, i, np.array([line]), 0.1)[0] for i, line, _ in docs])
    for split, want in (("train", ~is_valid), ("valid", is_valid)):
        expected = [t for t, w in zip(texts, want) if w]
        docs = _shard_docs(out, split)
        assert len(docs) == len(expected) > 0
        for doc, text in zip(docs, expected):
            assert doc.tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]
            assert tok.decode(doc[1:-1]) == text
    # Both languages made it through (20 EN then 40 JA documents in input order).
    assert is_valid[:20].sum() < 20 and is_valid[20:].sum() < 40


def test_counts_reconcile(packed: tuple[Path, PackSummary]) -> None:
    out, summary = packed
    meta = read_meta(out)
    assert summary.docs_in == 60 == summary.docs("train") + summary.docs("valid")
    n_valid = summary.docs("valid")
    assert 2 <= n_valid <= 12 and summary.rejected == {"bad_line": 0, "undecodable": 0, "empty": 0, "too_long": 0}
    assert [s["docs_in"] for s in meta["sources"]] == [20, 40]
    assert meta["dtype"] == "uint16" and meta["bos_id"] == 2 and meta["eos_id"] == 3
    for split in ("train", "valid"):
        m = meta["splits"][split]
        assert m["num_docs"] == summary.docs(split) == sum(s["docs"] for s in m["shards"])
        assert m["num_tokens"] == summary.tokens[split] == sum(s["tokens"] for s in m["shards"])
        for s in m["shards"]:
            assert (out / s["bin"]).stat().st_size == 2 * s["tokens"]
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert not list(out.glob("*.tmp"))
    text = summary.format()
    assert f"docs in 60 = train {60 - n_valid} + valid {n_valid} + rejected 0" in text


def test_repack_is_deterministic_and_removes_stale_shards(tok: Tokenizer, packed, tmp_path: Path) -> None:
    out, _ = packed
    again = tmp_path / "again"
    pack(TINY, tok.path, again, valid_fraction=0.1, shard_bytes=8000, seed=SEED, progress=False, num_proc=2)
    assert read_meta(again)["splits"] == read_meta(out)["splits"]
    for f in out.glob("*.bin"):
        assert (again / f.name).read_bytes() == f.read_bytes()
    pack(TINY, tok.path, again, valid_fraction=0.1, seed=SEED, progress=False)  # one chunk per input
    want = [f"{s}_0000{i}.bin" for s in ("train", "valid") for i in (0, 1)]
    assert sorted(f.name for f in again.glob("*.bin")) == want
    assert sorted(f.name for f in (again / "chunks").iterdir()) == ["00000.json", "00001.json"]


def test_retrained_tokenizer_at_same_path_is_not_served_stale_ids(tmp_path: Path) -> None:
    # PLATFORM_NOTES: the datasets map cache does not see the model's contents.
    for vocab in (1500, 2500):
        tok = train_tokenizer(TINY, tmp_path / "tok", vocab_size=vocab, model_type="bpe")
        pack(TINY[:1], tok.path, tmp_path / "out", valid_fraction=0, progress=False)
        assert read_meta(tmp_path / "out")["tokenizer_sha256"] == tok.sha256
        first = next(iter_jsonl(TINY[0]))[1]
        assert _shard_docs(tmp_path / "out", "train")[0][1:-1].tolist() == tok.encode(first)


def test_bad_json_line_fails_naming_file_and_line(tok: Tokenizer, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok"}', '{"text": "broken', '{"text": "ok too"}'])
    with pytest.raises(DataError, match=rf"{src}:2: not valid JSON"):
        pack([src], tok.path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_lines_skipped_and_counted(tok: Tokenizer, tmp_path: Path) -> None:
    src = _write_jsonl(
        tmp_path / "bad.jsonl",
        ['{"text": "ok"}', "not json", "[1, 2]", '{"body": "x"}', '{"text": 5}', "", '{"text": "ok too"}'],
    )
    summary = pack([src], tok.path, tmp_path / "out", valid_fraction=0, on_bad_line="skip", progress=False)
    assert summary.docs_in == 6  # the blank line is not a document
    assert summary.rejected == {"bad_line": 4, "undecodable": 0, "empty": 0, "too_long": 0}
    assert summary.docs("train") == 2 and summary.docs("valid") == 0
    assert [e.split(": ")[0] for e in summary.bad_line_examples] == [f"{src}:{n}" for n in (2, 3, 4, 5)]
    assert [tok.decode(d[1:-1]) for d in _shard_docs(tmp_path / "out", "train")] == ["ok", "ok too"]


def test_missing_field_and_wrong_type(tok: Tokenizer, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', '{"content": "x"}'])
    with pytest.raises(DataError, match=rf"{src}:2: missing field 'text'"):
        pack([src], tok.path, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=rf"{src}:1: missing field 'content'"):
        pack([src], tok.path, tmp_path / "out", text_field="content", progress=False)
    src2 = _write_jsonl(tmp_path / "b.jsonl", ['{"text": null}'])
    with pytest.raises(DataError, match=rf"{src2}:1: field 'text' is NoneType"):
        pack([src2], tok.path, tmp_path / "out", progress=False)


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    src = tmp_path / "u.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{src}:2: not valid UTF-8"):
        list(iter_jsonl(src))


def test_empty_texts_rejected_and_counted(tok: Tokenizer, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "e.jsonl", ['{"text": "a"}', '{"text": ""}', '{"text": " \\n "}', '{"text": "b"}'])
    summary = pack([src], tok.path, tmp_path / "out", valid_fraction=0, progress=False)
    assert summary.docs_in == 4 and summary.rejected == {"bad_line": 0, "undecodable": 0, "empty": 2, "too_long": 0}
    assert summary.docs("train") == 2
    assert read_meta(tmp_path / "out")["sources"][0]["rejected"]["empty"] == 2
    only_empty = _write_jsonl(tmp_path / "only.jsonl", ['{"text": ""}'])
    with pytest.raises(DataError, match="no documents left to pack"):
        pack([only_empty], tok.path, tmp_path / "out2", progress=False)


def test_missing_paths_are_named(tok: Tokenizer, packed, tmp_path: Path) -> None:
    out, _ = packed
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        pack([TINY[0], tmp_path / "nope.jsonl"], tok.path, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        pack(TINY, tmp_path / "nope.model", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_dir")):
        PackedDataset(tmp_path / "no_dir", "train", 16)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty_dir" / "meta.json")):
        PackedDataset(tmp_path / "empty_dir", "train", 16)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        if f.is_file() and f.name != "train_00001.bin":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=str(broken / "train_00001.bin")):
        PackedDataset(broken, "train", 16)


def test_cli_summary_and_error(tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--input", *map(str, TINY), "--tokenizer", tok.path, "--output", str(tmp_path / "o"), "--no-progress"]
    assert pack_cli.main(argv) == 0
    assert "docs in 60 = train 55 + valid 5 + rejected 0" in capsys.readouterr().out
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    assert pack_cli.main(["--input", str(bad), "--tokenizer", tok.path, "--output", str(tmp_path / "p")]) == 1
    assert f"{bad}:1:" in capsys.readouterr().err


def test_large_corpus_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    src = CORPUS / "en_botchan.jsonl"
    if not src.is_file():
        pytest.skip(f"larger corpus not available at {src}")
    pack([src], tok.path, tmp_path / "out", valid_fraction=0, progress=False)
    texts = [t for _, t in iter_jsonl(src) if t.strip()]
    docs = _shard_docs(tmp_path / "out", "train")
    assert [d[1:-1].tolist() for d in docs] == tok.encode_batch(texts)


# --- reading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [64, 1000])
def test_dataset_labels_and_doc_ids(packed: tuple[Path, PackSummary], tok: Tokenizer, seq_len: int) -> None:
    out, _ = packed
    ds = PackedDataset(out, "train", seq_len)
    stream = np.concatenate(_shard_docs(out, "train"))
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(_shard_docs(out, "train"))])
    assert ds.num_tokens == len(stream) and ds.num_docs == 60 - ds_valid_docs(out)
    assert len(ds) == (len(stream) - 1) // seq_len
    for i in range(len(ds)):
        s = ds[i]
        assert all(v.dtype == torch.int64 and v.shape == (seq_len,) for v in s.values())
        a = i * seq_len
        x, y, docs = stream[a : a + seq_len], stream[a + 1 : a + seq_len + 1], doc_of[a : a + seq_len + 1]
        assert s["input_ids"].tolist() == x.tolist()
        cross = docs[1:] != docs[:-1]
        assert s["labels"].tolist() == np.where(cross, IGNORE_INDEX, y).tolist()
        # A boundary is always eos followed by the next document's bos.
        assert (x[cross] == tok.eos_id).all() and (y[cross] == tok.bos_id).all()
        assert s["doc_ids"].tolist() == (docs[:-1] - docs[0]).tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_checks(packed: tuple[Path, PackSummary], tok: Tokenizer) -> None:
    out, _ = packed
    assert PackedDataset(out, "valid", 32, expect_tokenizer_sha256=tok.sha256).num_docs == ds_valid_docs(out) > 0
    with pytest.raises(DataError, match="tokenizer sha256"):
        PackedDataset(out, "train", 32, expect_tokenizer_sha256="0" * 64)
    with pytest.raises(KeyError, match="test"):
        PackedDataset(out, "test", 32)
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


# --- sampling ----------------------------------------------------------------------------------------


def test_sampler_epochs_are_seeded_permutations() -> None:
    s = GlobalSampler(10, seed=3)
    e0, e1 = [s.index(n) for n in range(10)], [s.index(n) for n in range(10, 20)]
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    assert [GlobalSampler(10, seed=3).index(n) for n in range(20)] == e0 + e1
    assert [GlobalSampler(10, seed=4).index(n) for n in range(10)] != e0
    assert [GlobalSampler(10, seed=3, shuffle=False).index(n) for n in range(12)] == [*range(10), 0, 1]


def _global_batch(ds, sampler, consumed: int, g: int, micro: int, dp: int) -> torch.Tensor:
    rows = [mb["input_ids"] for r in range(dp) for mb in micro_batches(ds, sampler, consumed, g, micro, r, dp)]
    assert all(row.shape == (micro, ds.seq_len) for row in rows)
    return torch.cat(rows)


def test_micro_batches_independent_of_dp_and_resumable(packed: tuple[Path, PackSummary]) -> None:
    out, _ = packed
    ds = PackedDataset(out, "train", 128)
    g, steps = 8, 50
    sampler = GlobalSampler(len(ds), seed=11)
    assert len(ds) < g * steps  # the run crosses an epoch boundary
    samples = [ds[sampler.index(n)]["input_ids"] for n in range(g * steps)]
    expected = [torch.stack(samples[k * g : (k + 1) * g]) for k in range(steps)]
    for dp, micro in ((1, 2), (2, 1), (2, 4), (4, 2)):
        got = [_global_batch(ds, GlobalSampler(len(ds), seed=11), k * g, g, micro, dp) for k in range(0, steps, 7)]
        assert all(torch.equal(a, expected[k]) for a, k in zip(got, range(0, steps, 7)))
    # Resume: a fresh sampler started at consumed_samples = N continues exactly.
    resumed = GlobalSampler(len(ds), seed=11)
    for k in range(steps - 3, steps):
        assert torch.equal(_global_batch(ds, resumed, k * g, g, 2, 2), expected[k])
    with pytest.raises(ValueError, match="not divisible"):
        micro_batches(ds, sampler, 0, 8, 3, 0, 2)
