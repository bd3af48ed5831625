"""Chunked gated delta rule in PyTorch (the WY / UT-transform form): the CPU path and the reference for kernels.

Same contract as `naive.naive_gated_delta`. Each batch row is one sequence of the shared variable-length
chunk engine (`fm_kernels.varlen`), which solves one unit-lower-triangular system per chunk for the
pseudo-values U = U0 - W S_0 and carries the (K, V) state from chunk to chunk (see `varlen/chunk.py`).
"""

from __future__ import annotations

import torch

from ..gated.naive import document_index
from ..varlen import dense_layout, from_chunks, to_chunks, varlen_chunk_scan


def _items(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, *D) -> (B * T, H, *D), row-major over (B, T)."""
    B, H, T = x.shape[:3]
    return x.movedim(1, 2).reshape(B * T, H, *x.shape[3:])


def chunk_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k (B, H, T, K); v (B, H, T, V); g, beta (B, H, T); doc_ids (B, T); initial_state (B, H, K, V)
    (applies to the first document). Returns o (B, H, T, V) in q's dtype and, if asked, the final state
    (B, H, K, V) in fp32 (fp64 for fp64)."""
    B, H, T, K = q.shape
    doc = document_index(doc_ids, B, T, q.device)
    layout = dense_layout(doc, chunk_size)
    res = varlen_chunk_scan(
        q=to_chunks(_items(q), layout), k=to_chunks(_items(k), layout), v=to_chunks(_items(v), layout),
        g=to_chunks(_items(g), layout), beta=to_chunks(_items(beta), layout), layout=layout,
        initial_state=initial_state, output_final_state=output_final_state,
    )  # fmt: skip
    o = from_chunks(res.o, layout).view(B, T, H, -1).transpose(1, 2)
    return o, res.final_state
