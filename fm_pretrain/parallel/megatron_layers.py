"""megatron-core's tensor-parallel layers, adapted to be called like their PyTorch counterparts.

Weights are allocated here but never initialised: `DecoderLM` builds the full TP = 1 weights and loads
each rank's shard (sharding.py), so TP = 2 starts from exactly the TP = 1 model. CPU initialisation
(`use_cpu_initialization`) is the one path that works on CPU and GPU alike; DeepSpeed moves the module.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ._megatron import ModelParallelConfig, tensor_parallel


@functools.cache
def model_parallel_config(tp: int) -> ModelParallelConfig:
    # Fused and overlapped paths need apex/TransformerEngine or CUDA streams: all off.
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """y_local = x W_local^T, W split by output rows; x replicated (its gradient is all-reduced)."""

    def __init__(self, d_in: int, d_out: int, tp: int, shared_weight: bool = False):
        super().__init__(
            d_in,
            d_out,
            config=model_parallel_config(tp),
            init_method=nn.init.zeros_,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=shared_weight,
        )

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, weight)[0]


class RowLinear(tensor_parallel.RowParallelLinear):
    """y = sum over TP ranks of x_local W_local^T (all-reduce); x is this rank's slice of the input features."""

    def __init__(self, d_in: int, d_out: int, tp: int):
        super().__init__(
            d_in,
            d_out,
            config=model_parallel_config(tp),
            init_method=nn.init.zeros_,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    def __init__(self, vocab: int, d_model: int, tp: int):
        super().__init__(vocab, d_model, init_method=nn.init.zeros_, config=model_parallel_config(tp))


def tp_sum(x: torch.Tensor) -> torch.Tensor:
    """All-reduce over the TP group in forward, identity in backward (each rank's share keeps its gradient)."""
    return tensor_parallel.reduce_from_tensor_model_parallel_region(x)


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    from .cpu_shim import cpu_device_shim

    with cpu_device_shim():  # megatron allocates the gather buffer on torch.cuda.current_device()
        return tensor_parallel.gather_from_tensor_model_parallel_region(x)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean token cross entropy from vocab-sharded logits (B, T, V / tp); labels equal to ignore_index do not
    count, as in F.cross_entropy. megatron-core has no ignore_index and works in place on its input: it gets
    an fp32 copy and a valid dummy target where the label is ignored. No label smoothing (buggy at TP > 1)."""
    valid = labels != ignore_index
    target = labels.masked_fill(~valid, 0)
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), target)
    return (per_token * valid).sum() / valid.sum()
