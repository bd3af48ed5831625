"""Gated delta rule (Gated DeltaNet): per-step reference and decode step (`naive.py`), chunked PyTorch path in the
WY / UT-transform form (`chunk.py`, on the shared variable-length engine `fm_kernels.varlen`), and the optional
flash-linear-attention kernel (`fla.py`, CUDA) chosen by `dispatch.py`."""

from .chunk import chunk_gated_delta
from .dispatch import DELTA_BACKENDS, gated_delta, resolve_delta_backend
from .fla import fla_available, fla_chunk_gated_delta
from .naive import gated_delta_step, naive_gated_delta

__all__ = [
    "DELTA_BACKENDS",
    "chunk_gated_delta",
    "fla_available",
    "fla_chunk_gated_delta",
    "gated_delta",
    "gated_delta_step",
    "naive_gated_delta",
    "resolve_delta_backend",
]
