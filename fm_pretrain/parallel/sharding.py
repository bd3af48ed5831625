"""How each tensor-parallel parameter maps to the full (TP = 1) parameter, and back.

A sharded parameter carries a `TPSplit`: the dimension it is split along and the *segments* of the full
tensor along that dimension. Every segment is split into `tp` equal contiguous chunks and rank r holds
chunk r of each segment, concatenated. A plain column or row split is one segment; Mamba-2's fused
`in_proj` is five (z | x | B | C | dt), so each rank holds its own heads' rows of all five. `full_len` below
the segments' sum means padding (the vocabulary rounded up to a multiple of TP); padding rows are zeros.

The same two functions serve initialisation (the full TP = 1 weights are built, then each rank keeps its
shard), the tests (gathered shards compared with the TP = 1 model) and checkpoint conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TP_SPLIT_ATTR = "tp_split"
EXTRA_STATE = "_extra_state"  # megatron-core layers add an empty entry to the state dict; not a tensor


@dataclass(frozen=True)
class TPSplit:
    dim: int
    segments: tuple[int, ...]
    full_len: int  # length of the unpadded full tensor along `dim`


def local_size(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by parallel.tensor_parallel={tp}")
    return n // tp


def mark_split(param: torch.Tensor, dim: int, segments: tuple[int, ...] | list[int], full_len: int | None = None):
    """Record how `param` (this rank's shard) sits in the full parameter; DeepSpeed and megatron-core read the
    `tensor_model_parallel` flag (a sharded gradient counts on every TP rank in the global grad norm)."""
    segments = tuple(int(s) for s in segments)
    setattr(param, TP_SPLIT_ATTR, TPSplit(dim, segments, sum(segments) if full_len is None else full_len))
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def tp_split_of(param: torch.Tensor) -> TPSplit | None:
    return getattr(param, TP_SPLIT_ATTR, None)


def shard_tensor(full: torch.Tensor, split: TPSplit, rank: int, tp: int) -> torch.Tensor:
    if full.shape[split.dim] != split.full_len:
        raise ValueError(f"full tensor has {full.shape[split.dim]} along dim {split.dim}, expected {split.full_len}")
    pad = sum(split.segments) - split.full_len
    if pad:
        shape = list(full.shape)
        shape[split.dim] = pad
        full = torch.cat([full, full.new_zeros(shape)], dim=split.dim)
    pieces = full.split(list(split.segments), dim=split.dim)
    return torch.cat([p.chunk(tp, dim=split.dim)[rank] for p in pieces], dim=split.dim)


def unshard_tensor(shards: list[torch.Tensor], split: TPSplit) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks' shards (in TP rank order); padding is dropped."""
    tp = len(shards)
    local = [s // tp for s in split.segments]
    per_rank = [s.split(local, dim=split.dim) for s in shards]
    full = torch.cat([torch.cat([pr[i] for pr in per_rank], dim=split.dim) for i in range(len(local))], split.dim)
    return full.narrow(split.dim, 0, split.full_len)


def full_numel(param: torch.Tensor) -> int:
    """Number of elements of the full (TP = 1) parameter this tensor is a shard of."""
    split = tp_split_of(param)
    if split is None:
        return param.numel()
    return param.numel() // param.shape[split.dim] * split.full_len


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """This rank's state dict from a full (TP = 1) one, for `model` (a TP model)."""
    out = {}
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith(EXTRA_STATE)}
    missing = sorted(set(own) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing[:5]}")
    for name, local in own.items():
        split = tp_split_of(local)
        out[name] = full[name] if split is None else shard_tensor(full[name], split, rank, tp)
    return out


# ---- checkpoints: the split table travels with a TP checkpoint, so another TP size can merge its shards ----

TP_SPLITS_KEY = "fm_pretrain_tp_splits"  # inside DeepSpeed's universal_checkpoint_info dict of a checkpoint


def split_table(model: nn.Module) -> dict[str, TPSplit]:
    """{parameter name: TPSplit} of the sharded parameters, tied ones under each of their names (a checkpoint
    holds `lm_head.weight` next to `embed.weight` when they are tied)."""
    params = model.named_parameters(remove_duplicate=False)
    return {name: split for name, p in params if (split := tp_split_of(p)) is not None}


def checkpoint_info(model: nn.Module, tp: int) -> dict:
    """What a TP checkpoint records about its layout (JSON-able): the TP size and every parameter's split.
    Parameters not listed are whole on every TP rank (norms)."""
    table = split_table(model)
    splits = {n: {"dim": s.dim, "segments": list(s.segments), "full_len": s.full_len} for n, s in table.items()}
    return {"universal_checkpoint_version": 0.2, TP_SPLITS_KEY: {"tp": tp, "splits": splits}}


def splits_from_info(info: dict | None, where: str) -> tuple[int, dict[str, TPSplit]]:
    """(TP size, {name: TPSplit}) from a checkpoint's universal_checkpoint_info (inverse of `checkpoint_info`)."""
    recorded = (info or {}).get(TP_SPLITS_KEY)
    if recorded is None:
        raise ValueError(f"{where}: universal_checkpoint_info has no '{TP_SPLITS_KEY}' (how the TP shards split)")
    splits = {}
    for name, s in recorded["splits"].items():
        splits[name] = TPSplit(int(s["dim"]), tuple(int(x) for x in s["segments"]), int(s["full_len"]))
    return int(recorded["tp"]), splits
