"""Crash and resume of data_prep/pack.py: a real subprocess killed with SIGKILL mid-shard, then re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fm_pretrain.data.pack import pack
from fm_pretrain.data.tokenizer import Tokenizer, train_tokenizer
from fm_pretrain.testing.faults import fault_env
from tests.helpers.paths import REPO  # noqa: E402

TINY = [REPO / "data/tiny/tiny_en.jsonl", REPO / "data/tiny/tiny_ja.jsonl"]
OPTS = dict(valid_fraction=0.1, shard_bytes=8000, on_bad_line="skip", max_doc_tokens=300, too_long="split")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(TINY, tmp_path_factory.mktemp("tok") / "tok", vocab_size=2000, model_type="bpe")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    bad = tmp_path_factory.mktemp("in") / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": \n{"text": ""}\n{"text": "also fine"}\n')
    return [*TINY, bad]


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cli(inputs: list[Path], tok: Tokenizer, out: Path) -> list[str]:
    args = [sys.executable, str(REPO / "data_prep/pack.py"), "--input", *map(str, inputs), "--tokenizer", tok.path]
    args += ["--output", str(out), "--num-proc", "2", "--no-progress", "--on-bad-line", "skip"]
    args += ["--valid-fraction", "0.1", "--shard-bytes", "8000", "--max-doc-tokens", "300", "--too-long", "split"]
    return args


def test_killed_run_resumes_to_identical_output(tok: Tokenizer, inputs: list[Path], tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    ref_summary = pack(inputs, tok.path, reference, num_proc=1, progress=False, **OPTS)
    assert ref_summary.chunks >= 10 and ref_summary.rejected["bad_line"] == 1

    out = tmp_path / "out"
    env = {
        **os.environ,
        **fault_env(kill_in_pack=6),
    }  # the worker packing chunk 6 kills the whole process group mid-shard
    killed = subprocess.run(cli(inputs, tok, out), env=env, start_new_session=True, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not (out / "meta.json").exists(), "a killed run must not look complete"
    assert (out / "train_00006.bin.tmp").exists() or (out / "valid_00006.bin.tmp").exists()
    assert not (out / "chunks" / "00006.json").exists()
    done_before = {p.name for p in (out / "chunks").glob("*.json")}
    assert done_before, "no chunk finished before the kill: the test does not exercise reuse"

    resumed = subprocess.run(cli(inputs, tok, out), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{ref_summary.chunks} chunks, {len(done_before)} reused" in resumed.stdout
    assert files(out) == files(reference)  # shards, indexes, markers, rejects.jsonl, meta.json: byte for byte


def test_changed_options_or_damaged_shards_are_redone(tok: Tokenizer, inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = pack(inputs, tok.path, out, progress=False, **OPTS)
    reference = files(out)
    assert pack(inputs, tok.path, out, progress=False, **OPTS).chunks_reused == first.chunks
    (out / "train_00002.bin").write_bytes(b"\0" * 10)  # damaged: size no longer matches its marker
    assert pack(inputs, tok.path, out, progress=False, **OPTS).chunks_reused == first.chunks - 1
    assert files(out) == reference
    reseeded = pack(inputs, tok.path, out, progress=False, **{**OPTS, "seed": 99})
    assert reseeded.chunks_reused == 0 and files(out) != reference
