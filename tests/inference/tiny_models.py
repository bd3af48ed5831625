"""Tiny models of every mixer for the inference and long-context tests (random weights, CPU, fp32 or fp64)."""

import torch

from fm_pretrain.config import from_dict
from fm_pretrain.model import DecoderLM

PATTERNS = {
    "fm_dense": ["fm"],
    "fm_sparse": ["fm"],
    "mamba2": ["mamba2"],
    "attention": ["attention"],
    "hybrid": ["fm", "attention", "mamba2"],
}


def tiny_lm(name: str, vocab: int = 64, dtype: torch.dtype = torch.float32, init_std: float = 0.2) -> DecoderLM:
    """A 2-3 layer model of `name` (PATTERNS) with chunk sizes of 4, so prompts cross chunk edges; init_std 0.2
    makes greedy outputs vary with the input (at 0.02 a random model repeats one token)."""
    torch.manual_seed(0)
    return DecoderLM(tiny_config(name, vocab, init_std=init_std).model).to(dtype).eval()


def tiny_config(name: str, vocab: int, tokenizer: str = "", init_std: float = 0.2):
    """The ExperimentConfig of `tiny_lm(name, vocab)`, with data.tokenizer set (what a run records)."""
    pattern = PATTERNS[name]
    model = {
        "vocab_size": vocab, "d_model": 32, "n_layers": max(2, len(pattern)), "layer_pattern": pattern,
        "max_seq_len": 256, "init_std": init_std,
        "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": None if name == "fm_dense" else 3, "chunk_size": 4},
        "attention": {"n_heads": 4, "n_kv_heads": 2},
        "mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 4},
    }  # fmt: skip
    return from_dict({"model": model, "data": {"tokenizer": tokenizer}, "tracking": {"experiment": "inference-tests"}})


def write_checkpoint(model: DecoderLM, cfg, run_dir, step: int = 1, tokenizer_sha256: str | None = None):
    """Write `model` as step `step` of run_dir in the on-disk form of a ZeRO-0 save (module states + meta.json +
    latest), which `fm_pretrain.checkpoint.load_model` reads without DeepSpeed. Returns the step directory."""
    from pathlib import Path

    from fm_pretrain.checkpoint.format import CheckpointLayout, step_tag, write_latest, write_meta
    from fm_pretrain.config import to_dict

    ckpt = Path(run_dir) / "checkpoints"
    step_dir = ckpt / step_tag(step)
    step_dir.mkdir(parents=True)
    torch.save({"module": model.float().state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    extra = {"config": to_dict(cfg), "tokenizer_sha256": tokenizer_sha256}
    write_meta(step_dir, step, 0, CheckpointLayout(dp=1, zero_stage=0), extra)
    write_latest(ckpt, step_tag(step))
    return step_dir
