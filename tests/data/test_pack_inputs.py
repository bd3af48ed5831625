"""Packing every input format, planted bad lines, the too-long policies and the real EN/JA corpora.

Real sentencepiece, gzip, zstandard, pyarrow and datasets; nothing mocked. Each test checks that the
documents in reconcile: docs in = packed (train + valid) + rejected, per kind, and in rejects.jsonl.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

for _var, _val in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_UPDATE_DOWNLOAD_COUNTS", "0")):
    os.environ.setdefault(_var, _val)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zstandard  # noqa: E402

from fm_pretrain.data import DataError  # noqa: E402
from fm_pretrain.data.pack import pack  # noqa: E402
from fm_pretrain.data.readers import iter_documents  # noqa: E402
from fm_pretrain.data.shards import REJECTS_FILE, read_meta  # noqa: E402
from fm_pretrain.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from tests.helpers.paths import REPO  # noqa: E402

TINY = [REPO / "data/tiny/tiny_en.jsonl", REPO / "data/tiny/tiny_ja.jsonl"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(TINY, tmp_path_factory.mktemp("tok") / "tok", vocab_size=2000, model_type="bpe")


def stored_docs(data_dir: Path, split: str = "train") -> list[list[int]]:
    """Every stored document of a split, in order, read straight from the files."""
    meta = read_meta(data_dir)
    docs = []
    for shard in meta["splits"][split]["shards"]:
        tokens = np.fromfile(data_dir / shard["bin"], dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
        idx = np.load(data_dir / shard["idx"])
        docs += [tokens[a:b].astype(np.int64).tolist() for a, b in zip(idx[:-1], idx[1:])]
    return docs


def reconcile(data_dir: Path) -> dict:
    """meta.json's counts add up, per source and in total, and rejects.jsonl lists every rejection."""
    meta = read_meta(data_dir)
    for s in meta["sources"]:
        assert s["docs_in"] == s["docs"]["train"] + s["docs"]["valid"] + sum(s["rejected"].values())
    rejects = [json.loads(line) for line in (data_dir / REJECTS_FILE).read_text().splitlines()]
    assert len(rejects) == sum(meta["rejected"].values())
    for kind, n in meta["rejected"].items():
        assert sum(r["kind"] == kind for r in rejects) == n
    assert meta["docs_in"] == sum(meta["docs_packed"].values()) + sum(meta["rejected"].values())
    return meta


def test_formats_give_the_same_documents(tok: Tokenizer, tmp_path: Path) -> None:
    """JSONL, .gz, .zst, parquet, text and a saved datasets directory all pack to the same tokens."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [t for _, t in iter_documents(TINY[1])][:12]
    lines = [t.replace("\n", " ") for t in texts]  # plain text: one document per line
    raw = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines).encode()
    inputs = {
        "a.jsonl": raw,
        "a.jsonl.gz": gzip.compress(raw[:500]) + gzip.compress(raw[500:]),  # two gzip members
        "a.jsonl.zst": zstandard.ZstdCompressor().compress(raw),
        "a.txt": ("\n".join(lines) + "\n\n").encode(),
    }
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"text": lines, "n": list(range(len(lines)))}), tmp_path / "a.parquet", row_group_size=5)
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(tmp_path / "hf_dir"))
    want = [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(lines)]
    for name in [*inputs, "a.parquet", "hf_dir"]:
        out = tmp_path / f"out_{name}"
        pack([tmp_path / name], tok.path, out, valid_fraction=0, shard_bytes=3000, progress=False)
        assert stored_docs(out) == want, name
        meta = reconcile(out)
        assert meta["docs_in"] == len(lines), name
        assert len(meta["splits"]["train"]["shards"]) > 1, name  # cut into several chunks
        if name != "hf_dir":
            assert meta["sources"][0]["sha256"] is not None


def test_planted_bad_lines_skip_mode(tok: Tokenizer, tmp_path: Path) -> None:
    """Invalid JSON, missing field, empty text, invalid UTF-8 and a truncated .gz: counted, listed, reconciled."""
    good = [json.dumps({"text": f"document number {i}"}).encode() for i in range(40)]
    lines = list(good)
    lines[3] = b'{"text": "broken'  # invalid JSON
    lines[7] = b'{"body": "no text field"}'  # missing field
    lines[11] = b'{"text": ""}'  # empty
    lines[13] = b'{"text": "  \\n "}'  # whitespace only
    lines[17] = b'{"text": "caf\xe9"}'  # invalid UTF-8 (latin-1 byte)
    plain = tmp_path / "bad.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    whole = gzip.compress(b"\n".join(good) + b"\n")
    trunc = tmp_path / "trunc.jsonl.gz"
    trunc.write_bytes(whole[: len(whole) // 2])  # ends mid-stream

    out = tmp_path / "out"
    summary = pack([plain, trunc], tok.path, out, valid_fraction=0.2, on_bad_line="skip", progress=False)
    meta = reconcile(out)
    bad, tr = meta["sources"]
    assert bad["docs_in"] == 40
    assert bad["rejected"] == {"bad_line": 2, "undecodable": 1, "empty": 2, "too_long": 0}
    assert bad["docs"]["train"] + bad["docs"]["valid"] == 35 and bad["docs"]["valid"] > 0
    # The truncated file: every line that decompressed completely is packed, the rest is one record.
    n_complete = sum(1 for _ in iter_documents(trunc, on_bad_line=lambda *a: None))
    assert 0 < n_complete < 40
    assert tr["docs_in"] == n_complete + 1 and tr["rejected"]["undecodable"] == 1
    rejects = [json.loads(line) for line in (out / REJECTS_FILE).read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects[:5]] == [
        (4, "bad_line"),
        (8, "bad_line"),
        (12, "empty"),
        (14, "empty"),
        (18, "undecodable"),
    ]
    assert rejects[5] == {
        "source": str(trunc.resolve()),
        "line": n_complete + 1,
        "kind": "undecodable",
        "reason": "compressed stream ends early (truncated file)",
    }
    assert f"{plain}:4: not valid JSON" in summary.format()
    # Packed documents are exactly the good ones (of both files; train and valid together).
    texts = [json.loads(line)["text"] for i, line in enumerate(lines) if i not in (3, 7, 11, 13, 17)]
    texts += [json.loads(line)["text"] for line in good[:n_complete]]
    packed = stored_docs(out, "train") + stored_docs(out, "valid")
    assert sorted(tok.decode(d[1:-1]) for d in packed) == sorted(texts)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"text": "ok"}\n{"text": "broken\n', r"bad.jsonl:2: not valid JSON"),
        (b'{"text": "ok"}\n\n{"title": "x"}\n', r"bad.jsonl:3: missing field 'text'"),
        (b'{"text": "ok"}\n{"text": "\xff"}\n', r"bad.jsonl:2: not valid UTF-8"),
    ],
)
def test_fail_mode_names_file_and_line(tok: Tokenizer, tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=match):
        pack([tmp_path / "bad.jsonl"], tok.path, tmp_path / "out", num_proc=2, progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_truncated_gz_fails_by_default(tok: Tokenizer, tmp_path: Path) -> None:
    data = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) - 40])
    with pytest.raises(DataError, match=r"t.jsonl.gz:\d+: compressed stream ends early"):
        pack([tmp_path / "t.jsonl.gz"], tok.path, tmp_path / "out", progress=False)


def test_too_long_policies(tok: Tokenizer, tmp_path: Path) -> None:
    all_ids = tok.encode_batch([t for _, t in iter_documents(TINY[0])])
    limit = sorted(map(len, all_ids))[len(all_ids) // 2]  # half the documents are longer
    assert 3 <= sum(len(x) > limit for x in all_ids) < len(all_ids)
    results = {}
    for policy in ("split", "truncate", "reject"):
        out = tmp_path / policy
        pack([TINY[0]], tok.path, out, valid_fraction=0, max_doc_tokens=limit, too_long=policy, progress=False)
        meta = reconcile(out)
        results[policy] = (meta, [d[1:-1] for d in stored_docs(out)])
    meta, docs = results["split"]
    assert docs == [x[i : i + limit] for x in all_ids for i in range(0, len(x), limit)]
    assert meta["rejected"]["too_long"] == 0
    assert meta["sources"][0]["split_docs"] == sum(len(x) > limit for x in all_ids)
    meta, docs = results["truncate"]
    assert docs == [x[:limit] for x in all_ids] and meta["sources"][0]["truncated_docs"] > 0
    meta, docs = results["reject"]
    assert docs == [x for x in all_ids if len(x) <= limit]
    assert meta["rejected"]["too_long"] == sum(len(x) > limit for x in all_ids)


def test_real_corpora_round_trip(shared_corpus: Path, tmp_path: Path) -> None:
    """The larger EN and JA corpora: each stored document is exactly the tokenization of its text, in order."""
    inputs = [shared_corpus / "en_botchan.jsonl", shared_corpus / "ja_docs.jsonl"]
    tok = train_tokenizer(
        [shared_corpus / "tiny_en.jsonl", shared_corpus / "tiny_ja.jsonl"], tmp_path / "tok", 2000, "bpe"
    )
    out = tmp_path / "out"
    pack(inputs, tok.path, out, valid_fraction=0, num_proc=2, shard_bytes=1 << 20, progress=False)
    meta = reconcile(out)
    assert len(meta["splits"]["train"]["shards"]) > 4
    texts = [t for p in inputs for _, t in iter_documents(p) if t.strip()]
    docs = stored_docs(out)
    assert len(docs) == len(texts) == meta["docs_packed"]["train"]
    assert [d[1:-1] for d in docs] == tok.encode_batch(texts, num_threads=2)
    assert {d[0] for d in docs} == {tok.bos_id} and {d[-1] for d in docs} == {tok.eos_id}
