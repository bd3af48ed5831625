"""Gated linear recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t: FM, Mamba-2 and GLA share it."""

from .chunk import chunk_gated_recurrence
from .dispatch import BACKENDS, gated_recurrence, resolve_backend, triton_available
from .naive import gated_recurrence_step, naive_gated_recurrence, state_dtype

# The Triton path (chunk_triton.triton_gated_recurrence) is imported on first use: triton.jit reads TRITON_INTERPRET.
__all__ = [
    "BACKENDS",
    "chunk_gated_recurrence",
    "gated_recurrence",
    "gated_recurrence_step",
    "naive_gated_recurrence",
    "resolve_backend",
    "state_dtype",
    "triton_available",
]
