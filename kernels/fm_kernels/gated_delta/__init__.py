"""Gated delta rule (Gated DeltaNet): per-step reference and decode step (`naive.py`), chunked PyTorch path in the
WY / UT-transform form (`chunk.py`, on the shared variable-length engine `fm_kernels.varlen`)."""

from .chunk import chunk_gated_delta
from .naive import gated_delta_step, naive_gated_delta

__all__ = ["chunk_gated_delta", "gated_delta_step", "naive_gated_delta"]
