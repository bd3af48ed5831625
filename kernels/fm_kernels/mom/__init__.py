"""Mixture-of-Memories ops: the literal dense reference over all M memories (`naive.py`), the O(k)-per-token path
that groups the (token, memory) pairs by memory with a stable sort and scans each memory over its own tokens
(`sparse.py`), and the decode step that touches only the k routed memories (`step.py`)."""

from .naive import naive_mom
from .sparse import Pairs, canonical_routing, combine_reads, group_pairs, mom_scan
from .step import mom_step

__all__ = ["Pairs", "canonical_routing", "combine_reads", "group_pairs", "mom_scan", "mom_step", "naive_mom"]
