"""Mamba-2 state-space duality (SSD): per-step reference, chunked path and one-token decoding step."""

from .chunk import add_skip, expand_groups, ssd_chunked, ssd_inputs, ssd_step
from .naive import ssd_naive

__all__ = ["add_skip", "expand_groups", "ssd_chunked", "ssd_inputs", "ssd_naive", "ssd_step"]
