"""Tensor parallelism (megatron-core) and the glue that hands its groups to DeepSpeed.

Importing this package is cheap: megatron-core is imported only by the modules that need it
(`_megatron.py` is the one place), so the model library still works with plain PyTorch at TP = 1.
"""

from .sharding import TPSplit, full_numel, mark_split, shard_tensor, tp_split_of, unshard_tensor

__all__ = ["TPSplit", "full_numel", "mark_split", "shard_tensor", "tp_split_of", "unshard_tensor"]
