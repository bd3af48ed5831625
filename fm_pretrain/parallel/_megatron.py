"""The one place megatron-core is imported (quietly: without TransformerEngine/Apex it warns on import)."""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

__all__ = ["ModelParallelConfig", "parallel_state", "tensor_parallel"]
