"""Factories for tensor-parallel-aware layers. At tp == 1 they return plain PyTorch modules and touch no
process group, so the model library works without any distributed setup; at tp > 1 megatron-core's layers
(imported only then), with each parameter's place in the full tensor recorded for sharding."""

from __future__ import annotations

import torch
from torch import nn

from .sharding import local_size, mark_split


def column_linear(d_in: int, d_out: int, tp: int, segments: tuple[int, ...] | None = None) -> nn.Module:
    """Linear split by output features. `segments`: the output's blocks that are each split across ranks
    (default one block), e.g. Mamba-2's fused z | x | B | C | dt projection."""
    if tp == 1:
        return nn.Linear(d_in, d_out, bias=False)
    from .megatron_layers import ColumnLinear

    segments = segments or (d_out,)
    for s in segments:
        local_size(s, tp, f"an output block of a {d_in}x{d_out} projection")
    layer = ColumnLinear(d_in, d_out, tp)
    mark_split(layer.weight, 0, segments)
    return layer


def row_linear(d_in: int, d_out: int, tp: int) -> nn.Module:
    """Linear split by input features; its input is this rank's slice (the output of column layers)."""
    if tp == 1:
        return nn.Linear(d_in, d_out, bias=False)
    from .megatron_layers import RowLinear

    local_size(d_in, tp, f"the input width of a {d_in}x{d_out} projection")
    layer = RowLinear(d_in, d_out, tp)
    mark_split(layer.weight, 1, (d_in,))
    return layer


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp (VocabParallelEmbedding splits it evenly)."""
    return -(-vocab_size // tp) * tp


def vocab_embedding(vocab_size: int, d_model: int, tp: int) -> nn.Module:
    if tp == 1:
        return nn.Embedding(vocab_size, d_model)
    from .megatron_layers import VocabEmbedding

    padded = padded_vocab(vocab_size, tp)
    layer = VocabEmbedding(padded, d_model, tp)
    mark_split(layer.weight, 0, (padded,), full_len=vocab_size)
    return layer


def vocab_head(d_model: int, vocab_size: int, tp: int) -> nn.Module:
    """LM head: at tp > 1 column-parallel over the (padded) vocabulary, producing vocab-sharded logits."""
    if tp == 1:
        return nn.Linear(d_model, vocab_size, bias=False)
    from .megatron_layers import ColumnLinear

    padded = padded_vocab(vocab_size, tp)
    layer = ColumnLinear(d_model, padded, tp)
    mark_split(layer.weight, 0, (padded,), full_len=vocab_size)
    return layer


def split_param(param: nn.Parameter, tp: int, dim: int = 0, segments: tuple[int, ...] | None = None) -> nn.Parameter:
    """Mark a parameter that the caller allocated at its local (per-rank) size as a TP shard."""
    if tp > 1:
        local = param.shape[dim]
        mark_split(param, dim, segments or (local * tp,))
    return param


def tp_mean(x: torch.Tensor, tp: int) -> torch.Tensor:
    """Mean over TP ranks of a per-rank quantity (e.g. a loss over this rank's heads); gradients stay local."""
    if tp == 1:
        return x
    from .megatron_layers import tp_sum

    return tp_sum(x) / tp
