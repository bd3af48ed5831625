"""Checkpoints and exports shared by the export and harness-parity tests, built once per session.

- Two real 2-rank training runs (`fm_pretrain/train.py` through torchrun, gloo on CPU, 3 steps) of tiny hybrids of
  every mixer: ZeRO-1 x DP 2 (sparse FM, tied embeddings) and ZeRO-3 x TP 2 (dense FM, untied), so the exporter
  reads ZeRO 1/2-style and ZeRO-3 shards, and merges tensor-parallel ones (about 12 s each).
- Single-mixer models (dense FM, sparse FM, attention, Mamba-2, GLA, Gated DeltaNet, MoM), a hybrid of the first
  three, and FM + Mamba-2 + GLA + MoM with Memory Caching on each, written in the on-disk form of a ZeRO-0 save, with
  random weights (init_std 0.2, so greedy outputs vary with the input).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.train_runs import TINY_HYBRID, data_overrides, run_training

# The transformers remote-code module cache of this session (instead of ~/.cache/huggingface/modules).
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="fm_pretrain_hf_modules_"))

SHORT_RUN = ["train.steps=3", "train.save_every=3", "train.val_every=100", "tracking.enabled=false"]
LAYOUTS = {
    "zero1": ["train.ds_config=ds_configs/zero1.json"],
    "zero3_tp2": [
        "train.ds_config=ds_configs/zero3.json",
        "parallel.tensor_parallel=2",
        "model.fm.top_k=null",
        "model.tie_embeddings=false",
    ],
}
MIXERS = {
    "fm_dense": (["fm"], None),
    "fm_sparse": (["fm"], 3),
    "attention": (["attention"], None),
    "mamba2": (["mamba2"], None),
    "hybrid": (["fm", "attention", "mamba2"], 3),
    "gla": (["gla"], None),
    "gated_delta": (["gated_delta"], None),
    "mom": (["mom"], None),
    "memory_caching": (["fm", "mamba2", "gla", "mom"], 3),  # Memory Caching (GRM) on all four
}
MEMORY_FAMILY = {
    "gla": {"n_heads": 2, "d_key": 16, "d_value": 16, "chunk_size": 8, "short_conv": True},
    "gated_delta": {"n_heads": 2, "d_key": 16, "d_value": 16, "chunk_size": 8},
    "mom": {"n_memories": 4, "top_k": 2, "n_heads": 2, "d_key": 16, "d_value": 16, "chunk_size": 8,
            "inner": "gated_delta"},
}  # fmt: skip
MODEL_EXTRA = {"memory_caching": {"memory_caching": {"mixers": ["fm", "mamba2", "gla", "mom"], "segment_size": 16}}}


@pytest.fixture(scope="session")
def train_layout(packed, tmp_path_factory):
    """layout name -> the run directory of a finished tiny training run in that layout (trained on first use)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            run_dir = tmp_path_factory.mktemp(f"run_{name}") / "run"
            run_training(run_dir, [*data_overrides(packed), *TINY_HYBRID, *SHORT_RUN, *LAYOUTS[name]])
            runs[name] = run_dir
        return runs[name]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """run directory -> its export (written once per session, not checked: the tests compare it themselves)."""
    from fm_pretrain.export import export_checkpoint

    done: dict[Path, Path] = {}

    def get(run_dir: Path) -> Path:
        if run_dir not in done:
            out = tmp_path_factory.mktemp("export") / "hf"
            done[run_dir] = export_checkpoint(run_dir, out, check=False)
        return done[run_dir]

    return get


def write_zero0_checkpoint(model, cfg, run_dir: Path, tokenizer_sha256: str, step: int = 1) -> Path:
    """`model` as step `step` of run_dir, in the on-disk form of a ZeRO-0 save (module states, meta.json, latest)."""
    from fm_pretrain.checkpoint.format import CheckpointLayout, step_tag, write_latest, write_meta
    from fm_pretrain.config import to_dict

    ckpt = run_dir / "checkpoints"
    step_dir = ckpt / step_tag(step)
    step_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    extra = {"config": to_dict(cfg), "tokenizer_sha256": tokenizer_sha256}
    write_meta(step_dir, step, 0, CheckpointLayout(dp=1, zero_stage=0), extra)
    write_latest(ckpt, step_tag(step))
    return step_dir


@pytest.fixture(scope="session")
def mixer_run(packed, tmp_path_factory):
    """name (MIXERS) -> a run directory holding a random model of that mixer, or the hybrid (ZeRO-0 form)."""
    from fm_pretrain.config import from_dict
    from fm_pretrain.data.tokenizer import Tokenizer
    from fm_pretrain.model import DecoderLM

    tok = Tokenizer(packed / "tokenizer.model")
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            pattern, top_k = MIXERS[name]
            model = {
                "vocab_size": tok.vocab_size, "d_model": 32, "n_layers": max(2, len(pattern)), "layer_pattern": pattern,
                "max_seq_len": 256, "init_std": 0.2, "tie_embeddings": name == "fm_sparse",
                "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": top_k, "chunk_size": 8},
                "attention": {"n_heads": 4, "n_kv_heads": 2},
                "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 8},
                **MEMORY_FAMILY, **MODEL_EXTRA.get(name, {}),
            }  # fmt: skip
            cfg = from_dict({"model": model, "data": {"tokenizer": str(packed / "tokenizer.model")}})
            torch.manual_seed(0)
            run_dir = tmp_path_factory.mktemp(f"mixer_{name}") / "run"
            write_zero0_checkpoint(DecoderLM(cfg.model), cfg, run_dir, tok.sha256)
            runs[name] = run_dir
        return runs[name]

    return get
