"""Mamba-2 state-space duality (SSD): per-step reference, chunked path and one-token decoding step."""

from .chunk import expand_groups, ssd_chunked, ssd_step
from .naive import ssd_naive

__all__ = ["expand_groups", "ssd_chunked", "ssd_naive", "ssd_step"]
