"""Chunked linear-memory scans over variable-length sequences (one state per sequence, document resets inside):
the engine behind Gated DeltaNet's chunked path, Mixture-of-Memories' per-memory scans and Memory Caching's
segment states. `layout.py` places the items in chunks, `chunk.py` runs the gated or gated-delta rule."""

from .chunk import ScanResult, varlen_chunk_scan
from .layout import VarlenLayout, build_layout, dense_layout, from_chunks, segment_cumsum, to_chunks

__all__ = [
    "ScanResult",
    "VarlenLayout",
    "build_layout",
    "dense_layout",
    "from_chunks",
    "segment_cumsum",
    "to_chunks",
    "varlen_chunk_scan",
]
