"""The data a training run reads: the training set and its sampler, and this rank's validation micro-batches,
from one packed directory (`data.path`) or a blend of several (`data.blend`, blend.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fm_pretrain.config import DataConfig
from fm_pretrain.data import DataError
from fm_pretrain.data.blend import BlendSampler, load_blend, open_split
from fm_pretrain.data.packed import GlobalSampler, PackedDataset, micro_batches


@dataclass
class TrainData:
    train: torch.utils.data.Dataset
    sampler: GlobalSampler | BlendSampler
    valid_batches: list[dict[str, torch.Tensor]]
    vocab_size: int
    tokenizer_sha256: str


def build_train_valid(
    cfg: DataConfig, tokenizer_sha256: str | None, micro_batch_size: int, dp: int, val_batches: int, dp_rank: int
) -> TrainData:
    """The training set and sampler, and this rank's validation micro-batches, from data.path or data.blend.

    Packed data must match the configured tokenizer (when given) and, in a blend, each other.
    Validation is the first `val_batches` micro-batches per rank in a fixed order (fewer when small).
    """
    if cfg.blend:
        spec = load_blend(cfg.blend)
        seed = spec.seed if spec.seed is not None else cfg.seed
        train, sampler, sha = open_split(spec, "train", cfg.seq_len, tokenizer_sha256, seed, shuffle=True)
        valid, valid_sampler, _ = open_split(spec, "valid", cfg.seq_len, sha, seed, shuffle=False)
        vocab = train.datasets[0].meta["vocab_size"]
        where = cfg.blend
    else:
        train = PackedDataset(cfg.path, "train", cfg.seq_len, expect_tokenizer_sha256=tokenizer_sha256)
        valid = PackedDataset(cfg.path, "valid", cfg.seq_len, expect_tokenizer_sha256=tokenizer_sha256)
        sampler = GlobalSampler(len(train), seed=cfg.seed)
        valid_sampler = GlobalSampler(max(len(valid), 1), seed=cfg.seed, shuffle=False)
        vocab, sha, where = train.meta["vocab_size"], train.meta["tokenizer_sha256"], cfg.path
    per_global_micro = micro_batch_size * dp
    n_valid = min(val_batches, len(valid) // per_global_micro) * per_global_micro
    if n_valid == 0:
        raise DataError(
            f"{where}: the valid split has {len(valid)} sequences of {cfg.seq_len} tokens, fewer "
            f"than one micro-batch per rank ({per_global_micro} in all); pack more validation data"
        )
    valid_batches = micro_batches(valid, valid_sampler, 0, n_valid, micro_batch_size, dp_rank, dp)
    return TrainData(train, sampler, valid_batches, int(vocab), sha)
