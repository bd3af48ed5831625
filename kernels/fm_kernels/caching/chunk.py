"""Memory Caching, parallel form: the online memory from the chunked scan, cached states from its own chunk
boundaries, reads of O(J) cached states per token (same contract as `naive.naive_memory_caching`).

1. Every document (checkpoint mode) or every segment of a document (independent mode) is one sequence of the
   variable-length chunked scan (`fm_kernels.varlen`), so positions count from the document start and, the
   segment size U being a multiple of the chunk size, every segment boundary is a chunk boundary of its sequence.
   The scan gives the online reads o_t and, for free, the state entering each chunk (checkpoint: the cached state
   of boundary j is the state entering the chunk that starts at position j U) or each sequence's final state
   (independent: the cached state of segment j). Caches never cross documents: a document is its own sequence.
2. Each token's cached boundaries J (segments.py: c for constant, popcount(c) for log, with c = n // U), their
   descriptors from prefix sums of `desc` within the document, scores <u_t, c^(j)>, and the aggregation weights.
3. The reads: residual / grm / soup read every cached segment, the same for all tokens of a chunk, so one
   (C x K) (K x V) matmul per (chunk, segment); ssc keeps top_k_segments per token and, once a chunk has more
   cached segments than C top_k_segments (`ssc_reads_per_token`), reads them with `reads.state_reads`
   (O(top_k_segments) states per token, memory bounded by token blocks), before that as grm does with the unkept
   weights 0; sparse FM's reads always gather only the token's k rows of each state. Plus w_online o_t.

Cost per token: residual and grm read c ~ n / U states (O(L^2 / U) in all), ssc top_k_segments, log popcount(c).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..gated.naive import document_index, state_dtype
from ..varlen import build_layout, from_chunks, segment_cumsum, to_chunks, varlen_chunk_scan
from .naive import CachingSpec, mix_weights
from .reads import state_reads
from .segments import boundaries, n_slots, segment_start, stored_boundaries, width_for


class CachingState(NamedTuple):
    """What decoding continues from, per row (the row's last document): see `step.py`."""

    state: torch.Tensor
    """(B, H, K, V) the online memory."""
    cached: torch.Tensor
    """(B, N, H, K, V) cached states of boundaries 1 .. N (slot j - 1; zeros past a row's count)."""
    csum_at: torch.Tensor
    """(B, N + 1, H, D) prefix sums of desc at each boundary (slot 0: 0)."""
    csum: torch.Tensor
    """(B, H, D) the running prefix sum of desc."""
    n: torch.Tensor
    """(B,) int64 tokens of the document consumed (the next token's position)."""


def document_positions(doc: torch.Tensor) -> torch.Tensor:
    """doc (B, T) document index -> position of each token in its document."""
    B, T = doc.shape
    t = torch.arange(T, device=doc.device).expand(B, T)
    start = torch.ones_like(doc, dtype=torch.bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return t - torch.where(start, t, torch.zeros_like(t)).cummax(dim=1).values


def _items(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, *D) -> (B T, H, *D)."""
    B, H, T = x.shape[:3]
    return x.movedim(1, 2).reshape(B * T, H, *x.shape[3:])


def memory_caching(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    desc: torch.Tensor,
    spec: CachingSpec,
    beta: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    read_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
    output_state: bool = False,
    cached_bias: float = 0.0,
) -> tuple[torch.Tensor, CachingState | None]:
    """q, k (B, H, T, K); v (B, H, T, V); g (B, H, T, K) or (B, H, T); beta (B, H, T) or None; u, desc (B, H, T, D);
    doc_ids (B, T). read_rows = (q_k, rows), both (B, H, T, k): the cached states are read at those rows only
    (sparse FM; q is then the zero-filled dense form of q_k, used by the online scan). segment_size must be a
    multiple of chunk_size. cached_bias: added to the cached segments' scores (-inf: the base mixer). Returns
    y (B, H, T, V) in q's dtype and, with output_state, the `CachingState` of every row's last document."""
    B, H, T, K = q.shape
    U = spec.segment_size
    C = min(chunk_size, U)
    if U % C:
        raise ValueError(f"memory caching: segment_size={U} must be a multiple of the chunk size {C}")
    dt = state_dtype(q)
    dev = q.device
    doc = document_index(doc_ids, B, T, dev).long()
    n = document_positions(doc)
    c = n // U
    independent = spec.state_mode == "independent"
    if independent and spec.segmentation != "constant":
        raise ValueError("memory caching: independent states are implemented for constant segmentation only")
    new_doc = torch.ones(B, T, dtype=torch.bool, device=dev)
    new_doc[:, 1:] = doc[:, 1:] != doc[:, :-1]
    new_seq = new_doc | (n % U == 0) if independent else new_doc
    seq = new_seq.reshape(-1).long().cumsum(0) - 1  # (B T,) sequence of each token, row-major
    n_seq = int(seq[-1]) + 1
    layout = build_layout(seq, torch.zeros_like(seq), n_seq, C)
    res = varlen_chunk_scan(
        q=to_chunks(_items(q), layout), k=to_chunks(_items(k), layout), v=to_chunks(_items(v), layout),
        g=to_chunks(_items(g), layout), layout=layout, beta=None if beta is None else to_chunks(_items(beta), layout),
        output_final_state=True, output_chunk_states=not independent,
    )  # fmt: skip
    online = from_chunks(res.o, layout).to(dt)  # (B T, H, V)

    # The state table and, for each token, the table index of each cached boundary j (-1: none).
    width = width_for(int(c.max()), spec.segmentation)
    js = boundaries(c.reshape(-1), spec.segmentation, width)  # (B T, J)
    valid = js > 0
    seq_tok = seq[:, None]
    if independent:
        table = res.final_state
        index = seq_tok - c.reshape(-1, 1) + js - 1  # segment j - 1 of the token's document
    else:
        table = res.chunk_states
        index = layout.seq_first_chunk[seq_tok] + js * (U // C)  # the chunk starting at position j U
    index = torch.where(valid, index, torch.full_like(index, -1))

    d_layout = layout
    if independent:  # the scan's sequences are segments: sum over whole documents instead
        doc_seq = new_doc.reshape(-1).long().cumsum(0) - 1
        d_layout = build_layout(doc_seq, torch.zeros_like(doc_seq), int(doc_seq[-1]) + 1, C)
    w0, w, incl = segment_weights(u, desc, spec, layout, d_layout, n, js, cached_bias, dt)
    index_h = index[:, None, :].expand_as(w)
    if read_rows is not None or ssc_reads_per_token(spec, width, C):
        if spec.aggregation == "ssc":  # only the kept segments are read: O(top_k_segments) states per token
            w, index_h = compact(w, index_h, spec.top_k_segments)
        if read_rows is not None:  # sparse FM: every read gathers only the token's k rows of each state
            q_k, rows = read_rows
            cached = state_reads(_items(q_k).to(dt), table, w, index_h, rows=_items(rows))
        else:
            cached = state_reads(_items(q).to(dt), table, w, index_h)
    else:  # every token of a chunk reads the same segments: one matmul per (chunk, segment); SSC's unkept are 0
        cached = _chunk_reads(to_chunks(_items(q).to(dt), layout), table, index, to_chunks(w, layout), layout)
    y = (w0[..., None] * online + cached).view(B, T, H, -1).transpose(1, 2).to(q.dtype)
    if not output_state:
        return y, None
    return y, _last_document_state(res, layout, table, n, c, incl, seq, spec, B, T)


def segment_weights(
    u: torch.Tensor,
    desc: torch.Tensor,
    spec: CachingSpec,
    layout,
    doc_layout,
    n: torch.Tensor,
    js: torch.Tensor,
    cached_bias: float = 0.0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The aggregation weights of every token (shared by `memory_caching` and `mom.mom_caching`). u, desc
    (B, H, T, D); layout: a chunk layout of the B T tokens (row-major items) in which all tokens of a chunk have the
    same cached segments (chunks start at document starts, U a multiple of C); doc_layout: one in which each
    document is one sequence (may be `layout`); n (B, T) document positions; js (B T, J) the cached boundaries
    (`segments.boundaries`, 0: none); dtype: the work dtype (default: the state dtype of u). Returns w0 (B T, H),
    w (B T, H, J) (`naive.mix_weights`) and the prefix sums of desc within each document, incl (B T, H, D)."""
    B, H, T = u.shape[:3]
    U = spec.segment_size
    dt = state_dtype(u) if dtype is None else dtype
    dev = u.device
    c = n // U
    valid = js > 0
    # Descriptors: prefix sums of desc within each document, read at segment edges (per document, so that they do
    # not depend on other documents even in rounding).
    d_items = _items(desc).to(dt)  # (B T, H, D)
    incl = segment_cumsum(d_items, doc_layout)  # desc summed over the token's document up to the token
    doc_start_item = (torch.arange(B * T, device=dev) - n.reshape(-1))[:, None]  # (B T, 1)

    def prefix(p: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Sum of desc over document positions [0, p) of the documents starting at items start (n, 1);
        p (n, J) -> (n, J, H, D)."""
        item = (start + p - 1).clamp(min=0)
        return incl[item] * (p > 0).to(dt)[..., None, None]

    # The cached segments' descriptors are the same for every token of a chunk: form them once per chunk.
    first = _chunk_first_items(layout, B * T)  # (Nc,)
    js_c = js[first]
    starts_c = segment_start(js_c, spec.segmentation)
    seg_sum = prefix(js_c * U, doc_start_item[first]) - prefix(starts_c * U, doc_start_item[first])
    desc_j = seg_sum / ((js_c - starts_c) * U).clamp(min=1).to(dt)[..., None, None]  # (Nc, J, H, D)
    u_items = _items(u).to(dt)
    z = from_chunks(torch.einsum("nhcd,njhd->nhcj", to_chunks(u_items, layout), desc_j), layout)  # (B T, H, J)
    unit_start = c.reshape(-1, 1) * U
    own = incl - prefix(unit_start, doc_start_item)[:, 0]  # desc summed over the token's unit so far
    desc_0 = own / (n.reshape(-1, 1) - unit_start + 1).to(dt)[..., None]
    z0 = (u_items * desc_0).sum(-1)
    valid_h = valid[:, None, :].expand_as(z)
    w0, w = mix_weights(z0, z, valid_h, spec, cached_bias)
    return w0, w, incl


def ssc_reads_per_token(spec: CachingSpec, width: int, chunk: int) -> bool:
    """Whether SSC reads each token's kept segments one by one (`reads.state_reads`: top_k_segments states per token,
    C top_k_segments per chunk) rather than every cached segment of the chunk at once (`_chunk_reads`: `width`
    states per chunk, one matmul each, the unkept segments with weight exactly 0): the former only when it reads
    fewer states, i.e. when a chunk has more than C top_k_segments cached segments (long contexts). Both give the
    same y."""
    return spec.aggregation == "ssc" and width > chunk * spec.top_k_segments


def compact(w: torch.Tensor, index: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SSC: the `keep` largest weights (N, H, J) and their state indices (N, H, J) -> (N, H, keep) each; the kept
    segments are exactly the non-zero weights (unkept ones have weight 0 and index -1)."""
    if w.shape[-1] <= keep:
        return w, index
    top = w.detach().topk(keep, dim=-1).indices
    w_k, i_k = w.gather(-1, top), index.gather(-1, top)
    return w_k, torch.where(w_k > 0, i_k, torch.full_like(i_k, -1))


def _chunk_first_items(layout, P: int) -> torch.Tensor:
    """(Nc,) the item in each chunk's first slot (never padding: chunks start at sequence starts or are full)."""
    Nc, C = layout.n_chunks, layout.chunk
    item_of_slot = layout.slot.new_full((Nc * C,), -1).index_copy(
        0, layout.slot, torch.arange(P, device=layout.slot.device)
    )
    return item_of_slot[torch.arange(Nc, device=layout.slot.device) * C]


def _chunk_reads(q_chunks, table, index, w_chunks, layout) -> torch.Tensor:
    """All tokens of a chunk share their cached segments (the segment size is a multiple of the chunk and chunks
    start at document starts): q (Nc, H, C, K), table (S, H, K, V), index (B T, J) per token, w (Nc, H, C, J) ->
    sum_j w_j S_j^T q per token, as items (B T, H, V)."""
    first_slot = _chunk_first_items(layout, index.shape[0])
    idx = index[first_slot]  # (Nc, J): the chunk's segments
    states = table[idx.clamp(min=0)] * (idx >= 0).to(table.dtype)[..., None, None, None]  # (Nc, J, H, K, V)
    reads = torch.einsum("nhck,njhkv->nhcjv", q_chunks, states)
    return from_chunks(torch.einsum("nhcjv,nhcj->nhcv", reads, w_chunks), layout)


def _last_document_state(res, layout, table, n, c, incl, seq, spec, B, T) -> CachingState:
    """The decoding state of each row's last document, from the parallel pass (the cache slots of
    `segments.stored_boundaries`: every boundary for constant segmentation, one per bit level for log)."""
    U = spec.segment_size
    last = torch.arange(B, device=n.device) * T + T - 1  # each row's last token (item index)
    n_last = n.reshape(-1)[last]
    pushed = (n_last + 1) // U  # boundaries completed in the last document
    N = max(1, n_slots(int(pushed.max()), spec.segmentation))
    j = stored_boundaries(pushed, spec.segmentation, N)  # (B, N) the boundary of each slot, 0: none
    have = j > 0
    final = res.final_state  # per sequence
    state = final[seq[last]]
    C = layout.chunk
    if spec.state_mode == "independent":
        idx = seq[last][:, None] - c.reshape(-1)[last][:, None] + j - 1
        # the last token may complete its segment: then its boundary's state is that sequence's final state
        cached = final[idx.clamp(min=0, max=final.shape[0] - 1)]
    else:
        first = layout.seq_first_chunk[seq[last]][:, None]
        at_end = j * U >= n_last[:, None] + 1  # boundary at the document's end: the final state
        chunk = (first + j * (U // C)).clamp(max=max(table.shape[0] - 1, 0))
        cached = torch.where(at_end[..., None, None, None], state[:, None], table[chunk])
    cached = cached * have[..., None, None, None].to(cached.dtype)
    doc_start = last - n_last
    tot = incl[last]  # (B, H, D)
    item = (doc_start[:, None] + j * U - 1).clamp(min=0, max=B * T - 1)  # prefix at boundary j
    csum_j = incl[item] * have[..., None, None].to(incl.dtype)
    csum_at = torch.cat([torch.zeros_like(tot)[:, None], csum_j], dim=1)
    return CachingState(state=state, cached=cached, csum_at=csum_at, csum=tot, n=n_last + 1)
