"""Gated linear recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t: FM, Mamba-2 and GLA share it."""

from .chunk import chunk_gated_recurrence
from .naive import gated_recurrence_step, naive_gated_recurrence, state_dtype

__all__ = ["chunk_gated_recurrence", "gated_recurrence_step", "naive_gated_recurrence", "state_dtype"]
