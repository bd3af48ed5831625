"""Mixture-of-Memories with O(k) work per token: the (token, memory) pairs grouped by memory.

Each token is routed to k of M memories. The layer's T k pairs are grouped as MoE layers group tokens by expert:

1. `group_pairs`: each token's k memories are put in increasing memory order (so that nothing depends on the
   order top-k returned them in), then the pairs, listed in (batch, time, slot) order, are sorted by
   sequence id `memory * B + batch` with a STABLE sort. Stability keeps every memory's pairs in time order
   (an unstable sort, as the reference's argsort, may reorder a memory's tokens); each (memory, row) is then
   one contiguous variable-length sequence, and all pairs of memory j are contiguous (for its projections).
   Each document of a sequence starts on a chunk boundary, so a document's scan does not depend on the
   others' routing.
2. `mom_scan`: every (memory, row) sequence runs its own recurrence over only its own tokens, through the
   variable-length chunked engine (`fm_kernels.varlen`; document resets carried along, initial and final
   states per memory). Work: O(T k) pairs, plus at most chunk - 1 padding slots per (memory, row).
3. `combine_reads`: the weighted reads go back to their tokens in (token, slot) order and each token sums its k,
   a fixed order: the outputs are identical, bit for bit, whatever order ties were broken in.

A memory no pair of a row reaches is an empty sequence: its final state is its initial state, bit for bit (or
0 if a document started in the row: every memory resets at document starts).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..gated.naive import document_index
from ..varlen import VarlenLayout, build_layout, from_chunks, to_chunks, varlen_chunk_scan


class Pairs(NamedTuple):
    """The routed (token, memory) pairs of a (B, T) batch, sorted by (memory, row, time). P pairs in all."""

    order: torch.Tensor
    """(P,) int64: index of each sorted pair in the canonical (batch, time, slot) list of B T k pairs."""
    token: torch.Tensor
    """(P,) int64: flat token index b * T + t of each sorted pair."""
    memory: torch.Tensor
    """(P,) int64: memory of each sorted pair."""
    doc: torch.Tensor
    """(P,) int64: document index (within its row) of each sorted pair."""
    memory_counts: list[int]
    """Pairs per memory (host integers): memory j's pairs are sorted pairs sum(counts[:j]) ... sum(counts[:j+1])."""
    layout: VarlenLayout
    """The chunk layout of the M B sequences (sequence id memory * B + batch)."""
    rows_doc: torch.Tensor
    """(B, T) int64 document index of every token."""


def canonical_routing(memories: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's k (memory, weight) pairs in increasing memory order: memories (..., k) int64, weights (..., k)."""
    memories, perm = memories.sort(dim=-1, stable=True)
    return memories, weights.gather(-1, perm)


def group_pairs(
    memories: torch.Tensor,
    n_memories: int,
    doc_ids: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    chunk: int = 32,
) -> Pairs:
    """memories (B, T, k) int64, distinct per token, in increasing order (`canonical_routing`); doc_ids (B, T);
    exclude (B, T) bool: tokens that route nowhere (left padding in generation). One host synchronisation."""
    B, T, k = memories.shape
    device = memories.device
    doc = document_index(doc_ids, B, T, device).long()
    mem_flat = memories.reshape(-1)
    batch = torch.arange(B, device=device).repeat_interleave(T * k)
    seq = mem_flat * B + batch
    if exclude is not None:  # excluded tokens get the sequence id M * B, sorted after every real sequence
        seq = seq.masked_fill(exclude.reshape(B * T).repeat_interleave(k), n_memories * B)
    seq_sorted, order = torch.sort(seq, stable=True)
    if exclude is not None:
        kept = int((seq_sorted < n_memories * B).sum())
        seq_sorted, order = seq_sorted[:kept], order[:kept]
    token = order // k
    layout = build_layout(seq_sorted, doc.reshape(-1)[token], n_memories * B, chunk, align_documents=True)
    counts = torch.bincount(mem_flat[order], minlength=n_memories).tolist()
    return Pairs(order=order, token=token, memory=mem_flat[order], doc=doc.reshape(-1)[token],
                 memory_counts=counts, layout=layout, rows_doc=doc)  # fmt: skip


def mom_scan(
    pairs: Pairs,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-pair inputs in sorted order: q, k (P, H, K), v (P, H, V), g (P, H, K) per-key or (P, H) per-head,
    beta (P, H) or None (gated rule); initial_state (B, M, H, K, V). Returns the reads (P, H, V) in q's dtype
    and, if asked, the final states (B, M, H, K, V) fp32 (fp64 for fp64): a memory's state is 0 when its row's
    last document started after the memory's last write."""
    lay = pairs.layout
    B = pairs.rows_doc.shape[0]
    M = lay.n_seq // B
    s0 = None
    if initial_state is not None:
        s0 = initial_state.transpose(0, 1).reshape(M * B, *initial_state.shape[2:])  # sequence = memory * B + b
    res = varlen_chunk_scan(
        q=to_chunks(q, lay), k=to_chunks(k, lay), v=to_chunks(v, lay), g=to_chunks(g, lay), layout=lay,
        beta=None if beta is None else to_chunks(beta, lay), initial_state=s0,
        final_doc=pairs.rows_doc[:, -1].repeat(M), output_final_state=output_final_state,
    )  # fmt: skip
    final = None
    if output_final_state:
        final = res.final_state.view(M, B, *res.final_state.shape[1:]).transpose(0, 1)
    return from_chunks(res.o, lay), final


def combine_reads(pairs: Pairs, reads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """reads (P, H, V) per sorted pair; weights (B, T, k) canonical routing weights -> o (B, H, T, V) in the
    reads' dtype: o_t = sum over the token's k pairs, in slot order, of weight * read (excluded tokens: 0),
    accumulated in fp32 (fp64 for fp64)."""
    B, T, k = weights.shape
    P, H, V = reads.shape
    work = torch.promote_types(reads.dtype, torch.float32)
    w = weights.reshape(-1)[pairs.order].to(work)
    per_slot = reads.new_zeros(B * T * k, H, V, dtype=work).index_copy(
        0, pairs.order, reads.to(work) * w[:, None, None]
    )
    return per_slot.view(B, T, k, H, V).sum(2).transpose(1, 2).to(reads.dtype)
