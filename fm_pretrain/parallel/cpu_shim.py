"""The small shim megatron-core needs on a machine without CUDA.

megatron-core allocates some buffers with `device=torch.cuda.current_device()` (all-gathers of
`gather_from_tensor_model_parallel_region`, sequence parallelism), which raises on a CPU-only build. Inside
`cpu_device_shim()` that call answers the CPU device instead. On a CUDA machine it changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_device_shim() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = original
