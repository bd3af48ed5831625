"""Memory Caching over linear memories (gated or gated-delta rule): the per-token reference (`naive.py`), the parallel
form on the variable-length chunked scan with cached states taken at its chunk boundaries (`chunk.py`), the
decoding step with a growing cache (`step.py`), the segmentations (`segments.py`) and the bounded-memory reads of
cached states (`reads.py`); Memory Caching over Mixture-of-Memories (`mom.py`: reference, parallel form, step)."""

from .chunk import CachingState, memory_caching
from .mom import (
    MoMCachingState,
    SharedInputs,
    empty_mom_state,
    mom_cache_bytes,
    mom_caching,
    mom_caching_step,
    naive_mom_caching,
)
from .naive import AGGREGATIONS, STATE_MODES, CachingSpec, naive_memory_caching
from .reads import state_reads, state_reads_reference
from .segments import SEGMENTATIONS, boundaries, segment_sizes
from .step import cache_bytes, caching_step, empty_like, empty_state, where_rows

__all__ = [
    "AGGREGATIONS",
    "SEGMENTATIONS",
    "STATE_MODES",
    "CachingSpec",
    "CachingState",
    "MoMCachingState",
    "SharedInputs",
    "boundaries",
    "cache_bytes",
    "caching_step",
    "empty_like",
    "where_rows",
    "empty_mom_state",
    "empty_state",
    "memory_caching",
    "mom_cache_bytes",
    "mom_caching",
    "mom_caching_step",
    "naive_memory_caching",
    "naive_mom_caching",
    "segment_sizes",
    "state_reads",
    "state_reads_reference",
]
