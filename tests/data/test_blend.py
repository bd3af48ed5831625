"""Blends: the spec, the sampler (same order for any DP size, exact resume, weights met) and the trainer on a blend."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fm_pretrain.config import ConfigError, load_config
from fm_pretrain.data import DataError
from fm_pretrain.data.blend import BlendSampler, apportion, load_blend
from fm_pretrain.data.pack import pack
from fm_pretrain.data.packed import micro_batches
from fm_pretrain.data.tokenizer import train_tokenizer
from fm_pretrain.data.training_data import build_train_valid
from tests.helpers.paths import TINY_DATA
from tests.helpers.train_runs import CONFIG, run_training

TINY = [TINY_DATA / "tiny_en.jsonl", TINY_DATA / "tiny_ja.jsonl"]


@pytest.fixture(scope="module")
def blend_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EN and JA packed separately, and a blend YAML (relative paths) weighting JA 3:1."""
    root = tmp_path_factory.mktemp("blend")
    tok = train_tokenizer(TINY, root / "tok", vocab_size=2000, model_type="bpe")
    for name, src in (("en", TINY[0]), ("ja", TINY[1])):
        pack([src], tok.path, root / name, valid_fraction=0.2, seed=3, progress=False)
    (root / "blend.yaml").write_text("train:\n  - {path: en, weight: 1}\n  - {path: ja, weight: 3}\n")
    return root


def _cfg(blend: Path, **kw) -> object:
    overrides = [f"data.blend={blend}", "data.path=''", *(f"{k}={v}" for k, v in kw.items())]
    return load_config(CONFIG, overrides).data


def test_sampler_order_independent_of_dp_and_resumable(blend_dir: Path) -> None:
    cfg = _cfg(blend_dir / "blend.yaml", **{"data.seq_len": 256})
    data = build_train_valid(cfg, None, 2, 1, 2, 0)
    ds, g, steps = data.train, 8, 40
    assert len(ds) < g * steps  # crosses epochs of both sources
    full = [ds[data.sampler.index(n)]["input_ids"] for n in range(g * steps)]
    for dp, micro in ((1, 8), (2, 2), (4, 1), (4, 2)):
        for step in range(0, steps, 9):
            sampler = build_train_valid(cfg, None, 2, 1, 2, 0).sampler  # a fresh one, as after a restart
            rows = [mb["input_ids"] for r in range(dp) for mb in micro_batches(ds, sampler, step * g, g, micro, r, dp)]
            assert torch.equal(torch.cat(rows), torch.stack(full[step * g : (step + 1) * g])), (dp, micro, step)
    # Resume at sample N with a fresh sampler: exactly the continuation.
    fresh = BlendSampler([len(d) for d in ds.datasets], [1, 3], seed=1234)
    n0 = 123
    assert [fresh.index(n) for n in range(n0, n0 + 50)] == [data.sampler.index(n) for n in range(n0, n0 + 50)]


def test_blend_weights_are_met() -> None:
    weights = [0.5, 0.3, 0.15, 0.05]
    s = BlendSampler([7, 1000, 13, 50], weights, seed=5)
    n = 20_000
    sources = np.array([s.source_of(i)[0] for i in range(n)])
    for k, w in enumerate(weights):
        frac = (sources[:n] == k).mean()
        assert abs(frac - w) <= 3 * math.sqrt(w * (1 - w) / n), (k, frac, w)
        # At every block boundary the counts are the apportionment of the exact share (within one sample).
        m = 3 * s.block
        assert abs((sources[:m] == k).sum() - w * m) < 1
    # Each source visits all its samples once per epoch.
    s_idx = [s.index(i) for i in range(n)]
    first_src0 = [i for i in s_idx if i < 7][:7]
    assert sorted(first_src0) == list(range(7))
    assert apportion(np.array([0.5, 0.5]), 3).tolist() == [2, 1]


def test_blend_spec_errors_name_file_and_key(tmp_path: Path, blend_dir: Path) -> None:
    bad = tmp_path / "b.yaml"
    bad.write_text("train:\n  - {path: x, weight: -1}\n")
    with pytest.raises(DataError, match=rf"{bad}: train\[0\].weight: must be a number > 0"):
        load_blend(bad)
    bad.write_text("train: []\n")
    with pytest.raises(DataError, match="train: expected a non-empty list"):
        load_blend(bad)
    bad.write_text("tran:\n  - {path: x}\n")
    with pytest.raises(DataError, match="unknown keys"):
        load_blend(bad)
    bad.write_text(f"train:\n  - {{path: {blend_dir / 'en'}}}\n  - {{path: {tmp_path / 'nope'}}}\n")
    with pytest.raises(FileNotFoundError, match=rf"{bad}: train\[1\].*packed data directory not found"):
        build_train_valid(_cfg(bad), None, 2, 1, 2, 0)
    with pytest.raises(DataError, match="tokenizer sha256"):
        build_train_valid(_cfg(blend_dir / "blend.yaml"), "0" * 64, 2, 1, 2, 0)
    with pytest.raises(ConfigError, match="data.blend"):
        load_config(CONFIG, [f"data.blend={bad}"])  # the demo config also sets data.path
    spec = load_blend(blend_dir / "blend.yaml")
    assert [e.split for e in spec.splits["valid"]] == ["valid", "valid"]
    assert [e.path for e in spec.splits["train"]] == [blend_dir / "en", blend_dir / "ja"]


SMALL = [
    "data.seq_len=64",
    "model.d_model=32",
    "model.n_layers=1",
    "model.fm.n_heads=2",
    "model.fm.n_memories=8",
    "model.fm.d_mem=8",
    "model.fm.top_k=2",
    "model.fm.chunk_size=16",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.val_batches=1",
    "train.val_every=2",
    "train.steps=4",
    "train.save_every=2",
    "optim.warmup_steps=1",
    "tracking.enabled=false",
]


@pytest.mark.slow
def test_trainer_consumes_blend_and_checkpoints_the_position(blend_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"data.blend={blend_dir / 'blend.yaml'}", "data.path=''", f"data.tokenizer={blend_dir / 'tok.model'}"]
    args += SMALL

    first = run_training(run_dir, args)
    consumed = {r["step"]: r["train/consumed_samples"] for r in first if "train/consumed_samples" in r}
    assert consumed == {1: 4, 2: 8, 3: 12, 4: 16}  # 2 ranks x 2 samples per step
    client = torch.load(run_dir / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["consumed_samples"] == 16 and client["step"] == 4

    # Rewind to step 2 and resume: the blend continues at sample 8, giving the same losses.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    (run_dir / "checkpoints" / "latest").write_text("step_2")
    (run_dir / "metrics.jsonl").unlink()
    second = run_training(run_dir, args)
    want = {r["step"]: r["train/loss"] for r in first if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in second if "train/loss" in r}
    assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in (3, 4)), (got, want)
