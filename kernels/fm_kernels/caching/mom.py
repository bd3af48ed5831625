"""Memory Caching over Mixture-of-Memories: the per-token reference, the parallel form and the decoding step.

MoM's state at a position is all M routed memories S^m plus the shared memory S^sh (if on). In `checkpoint` mode
(the only one for MoM: `independent` would restart M + 1 memories per segment and is refused) the whole state is
cached at every unit boundary j U of a document. A token t with routing (m_ti, w_ti), i = 1..k, and query q_t reads

    read_MoM(state, t) = sum_i w_ti (S^{m_ti})^T q_t + (S^sh)^T q_t

which is linear in the state, so the aggregations are the plain ones (`naive.py`) with this read:
residual y = o_t + sum_j read_MoM(cached_j, t); grm / soup y = gamma_0 o_t + sum_j gamma_j read_MoM(cached_j, t);
ssc the top_k_segments cached segments (`chunk.compact`). o_t is MoM's own online read (routed + shared), gamma the
same scores <u_t, c^(j)> over the same descriptors as the other mixers (`chunk.segment_weights`). Unrouted memories
are not decayed, so routed memory m's state at a boundary p is its state after its last routed write before p in
that document (zero if none there).

Parallel form (`mom_caching`): the routed pairs of each (memory, row) are one sequence of the varlen engine as in
`fm_kernels.mom`, with a chunk run starting at every document AND every unit change (`build_layout(align=...)`,
no state reset at a unit change). The state entering the chunk that starts at memory m's first pair at/after
boundary p is then m's state at p, for free (`chunk_states`); with no pair after p in the sequence it is the
sequence's unmasked final state; with no pair of that document before p it is zero. A searchsorted on the pairs'
(sequence, time) key finds that chunk. Cost: at most C - 1 padding slots per (memory, row, unit) on top of MoM's
scan. The shared memory (and, without it, only the descriptors) runs on one sequence per document as in
`memory_caching`: its cached states are its chunk-entry states. All cached reads, J (k + 1) states per token
(J = cached segments: c for residual/grm, top_k_segments for ssc, popcount(c) for log), are one
`reads.state_reads` call with weights gamma_j w_ti (routed) and gamma_j (shared).

Decoding (`mom_caching_step`): `fm_kernels.mom.mom_step` (only the k routed memories are loaded and updated), the
shared memory's step, reads of the cached states of the token's k memories and of the shared memory; a completed
segment caches the whole state (M + 1 memories).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..gated.naive import gated_recurrence_step, state_dtype
from ..gated_delta.naive import gated_delta_step
from ..mom import Pairs, combine_reads, mom_step
from ..varlen import ScanResult, build_layout, from_chunks, to_chunks, varlen_chunk_scan
from .chunk import CachingState, _items, _last_document_state, compact, document_positions, segment_weights
from .naive import CachingSpec, token_weights
from .reads import state_reads
from .segments import boundaries, cache_slot, stored_boundaries, width_for
from .step import cache_bytes, empty_state, push_completed, step_weights


class SharedInputs(NamedTuple):
    """The shared memory's inputs: k (.., H, [T,] K), v (.., V), g (.., K) or per head, beta per head or None."""

    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor | None = None


class MoMCachingState(NamedTuple):
    """What decoding continues from, per row (the row's last document)."""

    base: CachingState
    """The shared memory's online and cached states (K = V = 0 without a shared memory), the descriptor sums, n."""
    states: torch.Tensor
    """(B, M, H, K, V) the routed memories (updated in place by `mom_caching_step`, as `mom_step` does)."""
    cached: torch.Tensor
    """(B, N, M, H, K, V) the routed memories cached at boundaries 1 .. N (slot j - 1)."""


def _check(spec: CachingSpec) -> None:
    if spec.state_mode != "checkpoint":
        raise ValueError(
            f"memory caching over MoM: model.memory_caching.state_mode='{spec.state_mode}' is not supported "
            "(only 'checkpoint': independent segments would restart all M + 1 memories)"
        )


def _step(S, q, k, v, g, beta):
    return gated_recurrence_step(S, q, k, v, g) if beta is None else gated_delta_step(S, q, k, v, g, beta)


def naive_mom_caching(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    memories: torch.Tensor,
    weights: torch.Tensor,
    u: torch.Tensor,
    desc: torch.Tensor,
    spec: CachingSpec,
    beta: torch.Tensor | None = None,
    shared: SharedInputs | None = None,
    doc_ids: torch.Tensor | None = None,
    cached_bias: float = 0.0,
) -> torch.Tensor:
    """Per token, literally. q (B, H, T, K); k (B, M, H, T, K), v (B, M, H, T, V), g (B, M, H, T[, K]), beta
    (B, M, H, T) or None: every memory's inputs (as `mom.naive_mom`); memories, weights (B, T, k) the routing;
    u, desc (B, H, T, D); shared: the shared memory's inputs (B, H, T, .) or None. Returns y (B, H, T, V)."""
    _check(spec)
    B, M, H, T, K = k.shape
    V = v.shape[-1]
    U = spec.segment_size
    dt = state_dtype(q)
    out = q.new_zeros(B, H, T, V, dtype=dt)
    for b in range(B):
        n = 0
        for t in range(T):
            if t == 0 or (doc_ids is not None and doc_ids[b, t] != doc_ids[b, t - 1]):
                n, S, S_sh = 0, q.new_zeros(M, 1, H, K, V, dtype=dt), q.new_zeros(1, H, K, V, dtype=dt)
                csum = q.new_zeros(H, u.shape[-1], dtype=dt)
                cached, csum_at = {}, {0: csum.clone()}
            qt = q[b : b + 1, :, t]
            o = q.new_zeros(H, V, dtype=dt)
            for i in range(memories.shape[-1]):  # the routed memories only: the others are left unchanged
                m = int(memories[b, t, i])
                bt = None if beta is None else beta[b : b + 1, m, :, t]
                o_m, S_m = _step(S[m], qt, k[b : b + 1, m, :, t], v[b : b + 1, m, :, t], g[b : b + 1, m, :, t], bt)
                S = torch.cat([S[:m], S_m[None], S[m + 1 :]])
                o = o + weights[b, t, i].to(dt) * o_m[0].to(dt)
            if shared is not None:
                k_sh, v_sh, g_sh = (x[b : b + 1, :, t] for x in shared[:3])
                b_sh = None if shared.beta is None else shared.beta[b : b + 1, :, t]
                o_sh, S_sh = _step(S_sh, qt, k_sh, v_sh, g_sh, b_sh)
                o = o + o_sh[0].to(dt)
            csum = csum + desc[b, :, t].to(dt)
            js, w0, w = token_weights(u[b, :, t].to(dt), csum, csum_at, n, spec, cached_bias)
            y = w0[:, None] * o
            for a, j in enumerate(js):
                Sj, Sj_sh = cached[j]
                read = sum(
                    weights[b, t, i].to(dt) * torch.einsum("hkv,hk->hv", Sj[int(memories[b, t, i]), 0], qt[0].to(dt))
                    for i in range(memories.shape[-1])
                )
                if shared is not None:
                    read = read + torch.einsum("hkv,hk->hv", Sj_sh[0], qt[0].to(dt))
                y = y + w[:, a, None] * read
            out[b, :, t] = y
            if (n + 1) % U == 0:
                cached[(n + 1) // U] = (S.clone(), S_sh.clone())
                csum_at[(n + 1) // U] = csum.clone()
            n += 1
    return out.to(q.dtype)


def _routed_index(key, seq_p, doc_p, chunk_p, n_chunks, s, d, t_query, T):
    """Index into cat(chunk_states, final_state) of memory-sequence s's state at row time t_query (in [0, T]) of
    document d: the state after its last pair before t_query if that pair is in document d, else -1 (zero).
    key (P,) = seq * (T + 1) + time of the sorted pairs (increasing); s, d, t_query any shape."""
    s, d, t_query = torch.broadcast_tensors(s, d, t_query)
    P = key.numel()
    if P == 0:
        return torch.full_like(s, -1)
    i = torch.searchsorted(key, (s * (T + 1) + t_query).reshape(-1)).view_as(s)  # first pair at/after t_query
    prev = (i - 1).clamp(min=0)
    has_prev = (i > 0) & (seq_p[prev] == s) & (doc_p[prev] == d)
    nxt = i.clamp(max=P - 1)
    has_next = (i < P) & (seq_p[nxt] == s)  # then that pair starts a chunk run (a new unit or document)
    idx = torch.where(has_next, chunk_p[nxt], n_chunks + s)  # else the sequence's (unmasked) final state
    return torch.where(has_prev, idx, torch.full_like(idx, -1))


def mom_caching(
    pairs: Pairs,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    weights: torch.Tensor,
    u: torch.Tensor,
    desc: torch.Tensor,
    spec: CachingSpec,
    beta: torch.Tensor | None = None,
    shared: SharedInputs | None = None,
    chunk_size: int = 32,
    output_state: bool = False,
    cached_bias: float = 0.0,
) -> tuple[torch.Tensor, MoMCachingState | None]:
    """pairs: `mom.group_pairs` of the canonical routing (its own chunk layout is not used); q (B, H, T, K) the shared
    query; k (P, H, K), v (P, H, V), g (P, H, K) or (P, H), beta (P, H) or None: the routed pairs' inputs in sorted
    order (as `mom.mom_scan`); weights (B, T, k) canonical routing weights; u, desc (B, H, T, D); shared: the shared
    memory's inputs (B, H, T, .) or None. segment_size must be a multiple of chunk_size. Returns y (B, H, T, V) in
    q's dtype and, with output_state, the `MoMCachingState` of every row's last document."""
    _check(spec)
    B, H, T, K = q.shape
    U = spec.segment_size
    C = min(chunk_size, U)
    if U % C:
        raise ValueError(f"memory caching: segment_size={U} must be a multiple of the chunk size {C}")
    dt = state_dtype(q)
    dev = q.device
    doc = pairs.rows_doc
    n = document_positions(doc)
    c = n // U
    new_doc = torch.ones(B, T, dtype=torch.bool, device=dev)
    new_doc[:, 1:] = doc[:, 1:] != doc[:, :-1]
    seq = new_doc.reshape(-1).long().cumsum(0) - 1  # one sequence per document (shared memory, descriptors)
    layout = build_layout(seq, torch.zeros_like(seq), int(seq[-1]) + 1, C)
    width = width_for(int(c.max()), spec.segmentation)
    js = boundaries(c.reshape(-1), spec.segmentation, width)  # (B T, J)
    valid = js > 0
    w0, w, incl = segment_weights(u, desc, spec, layout, layout, n, js, cached_bias, dt)

    # Routed memories: one sequence per (memory, row); chunk runs start at every document and unit change.
    M = pairs.layout.n_seq // B
    t_pair = pairs.token % T
    seq_p = pairs.memory * B + pairs.token // T
    rlay = build_layout(seq_p, pairs.doc, M * B, C, align_documents=True, align=n.reshape(-1)[pairs.token] // U)
    qp = _items(q)[pairs.token]
    chunks = lambda x: None if x is None else to_chunks(x, rlay)  # noqa: E731
    res = varlen_chunk_scan(
        q=chunks(qp), k=chunks(k), v=chunks(v), g=chunks(g), layout=rlay, beta=chunks(beta),
        output_final_state=True, output_chunk_states=True,
    )  # fmt: skip
    online = combine_reads(pairs, from_chunks(res.o, rlay), weights).to(dt)  # (B, H, T, V)
    table_r = torch.cat([res.chunk_states, res.final_state])
    key = seq_p * (T + 1) + t_pair

    def locate(s, d, tq):
        return _routed_index(key, seq_p, pairs.doc, rlay.slot // C, rlay.n_chunks, s, d, tq, T)

    # Per token, per cached boundary j, per routed slot i: the table index of S^{m_ti} at j U (-1: zero).
    mem = pairs.memory.new_zeros(B * T * weights.shape[-1]).index_copy(0, pairs.order, pairs.memory)
    mem = mem.view(B * T, 1, -1)  # (B T, 1, k) (excluded tokens: memory 0 with weight 0)
    row = torch.arange(B, device=dev).repeat_interleave(T)[:, None, None]
    t_tok = torch.arange(B * T, device=dev) % T
    t_query = (t_tok - n.reshape(-1))[:, None, None] + js[..., None] * U  # (B T, J, 1) row time of boundary j
    r_idx = locate(mem * B + row, doc.reshape(-1)[:, None, None], t_query)
    r_idx = torch.where(valid[..., None], r_idx, torch.full_like(r_idx, -1))  # (B T, J, k)

    jpos = torch.where(valid, torch.arange(js.shape[1], device=dev), torch.full_like(js, -1))[:, None].expand_as(w)
    if spec.aggregation == "ssc":  # only the kept segments are read
        w, jpos = compact(w, jpos, spec.top_k_segments)
    kk = mem.shape[-1]
    r_sel = r_idx[:, None].expand(-1, H, -1, -1).gather(2, jpos.clamp(min=0)[..., None].expand(-1, -1, -1, kk))
    r_sel = torch.where((jpos >= 0)[..., None], r_sel, torch.full_like(r_sel, -1))  # (B T, H, J', k)
    routed = torch.zeros(B * T * kk, dtype=dt, device=dev).index_fill(0, pairs.order, 1.0)  # 0: excluded tokens
    w_tok = (weights.reshape(-1).to(dt) * routed).view(B * T, 1, 1, kk)
    w_r = w[..., None] * w_tok  # (B T, H, J', k)
    index, wts, table = [r_sel.flatten(2)], [w_r.flatten(2)], [table_r]
    o_sh, res_sh = None, None
    if shared is not None:
        res_sh = varlen_chunk_scan(
            q=to_chunks(_items(q), layout), k=to_chunks(_items(shared.k), layout),
            v=to_chunks(_items(shared.v), layout), g=to_chunks(_items(shared.g), layout), layout=layout,
            beta=None if shared.beta is None else to_chunks(_items(shared.beta), layout),
            output_final_state=True, output_chunk_states=True,
        )  # fmt: skip
        o_sh = from_chunks(res_sh.o, layout).to(dt)  # (B T, H, V)
        sh_idx = layout.seq_first_chunk[seq][:, None] + js * (U // C)  # the chunk starting at position j U
        sh_sel = sh_idx[:, None].expand(-1, H, -1).gather(2, jpos.clamp(min=0))
        index.append(torch.where(jpos >= 0, sh_sel + table_r.shape[0], torch.full_like(sh_sel, -1)))
        wts.append(w)
        table.append(res_sh.chunk_states)
    cached = state_reads(_items(q).to(dt), torch.cat(table), torch.cat(wts, -1), torch.cat(index, -1))
    o_items = _items(online) if o_sh is None else _items(online) + o_sh
    y = (w0[..., None] * o_items + cached).view(B, T, H, -1).transpose(1, 2).to(q.dtype)
    if not output_state:
        return y, None

    # The decoding state of each row's last document.
    if res_sh is None:  # descriptors only: a zero-width stand-in for the shared memory
        z = q.new_zeros(layout.n_seq, H, 0, 0, dtype=dt)
        res_sh = ScanResult(o=None, final_state=z, chunk_states=q.new_zeros(layout.n_chunks, H, 0, 0, dtype=dt))
    base = _last_document_state(res_sh, layout, res_sh.chunk_states, n, c, incl, seq, spec, B, T)
    N = base.cached.shape[1]
    last_doc = doc[:, -1]
    start = T - base.n  # (B,) row time of the last document's start
    # Column 0: the online state (at the row's end); then the boundary held in each cache slot (0: none).
    j = torch.cat([torch.zeros_like(base.n)[:, None], stored_boundaries(base.n // U, spec.segmentation, N)], 1)
    col = torch.arange(N + 1, device=dev)[None, :]
    have = (j > 0) | (col == 0)  # (B, N + 1)
    tq = torch.where(have & (col > 0), start[:, None] + j * U, torch.full_like(have, T, dtype=torch.long))
    s = torch.arange(M, device=dev)[None, None, :] * B + torch.arange(B, device=dev)[:, None, None]
    idx = locate(s, last_doc[:, None, None], tq[..., None])  # (B, N + 1, M)
    keep = (idx >= 0) & have[..., None]
    states = table_r[idx.clamp(min=0)] * keep.to(dt)[..., None, None, None]  # (B, N + 1, M, H, K, V)
    return y, MoMCachingState(base=base, states=states[:, 0].contiguous(), cached=states[:, 1:].contiguous())


def empty_mom_state(B, M, H, K, V, D, shared: bool, dtype: torch.dtype, device) -> MoMCachingState:
    """The state of rows that have consumed nothing (decoding from scratch)."""
    base = empty_state(B, H, K if shared else 0, V if shared else 0, D, dtype, device)
    z = torch.zeros(B, M, H, K, V, dtype=dtype, device=device)
    return MoMCachingState(base=base, states=z, cached=z.new_zeros(B, 0, M, H, K, V))


def mom_cache_bytes(st: MoMCachingState) -> int:
    """Bytes held by the cache: the online and cached states of every memory and the descriptor sums."""
    return cache_bytes(st.base) + sum(t.numel() * t.element_size() for t in (st.states, st.cached))


def mom_caching_step(
    st: MoMCachingState,
    memories: torch.Tensor,
    weights: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    desc: torch.Tensor,
    spec: CachingSpec,
    beta: torch.Tensor | None = None,
    shared: SharedInputs | None = None,
    cached_bias: float = 0.0,
) -> tuple[torch.Tensor, MoMCachingState]:
    """One token per row: memories, weights (B, k); q (B, H, K); k (B, k, H, K), v (B, k, H, V), g (B, k, H[, K]),
    beta (B, k, H) or None: the routed memories' inputs (as `mom.mom_step`); u, desc (B, H, D); shared: inputs
    (B, H, .) or None. Only the k routed memories are updated (in place) and read; the cached states grow by one
    slot (the whole MoM state) when a row completes a segment. Returns y (B, H, V) in q's dtype and the new state."""
    _check(spec)
    base = st.base
    dt = st.states.dtype
    B, H = q.shape[:2]
    kk = memories.shape[1]
    o = mom_step(st.states, memories, weights, q, k, v, g, beta).to(dt)
    S_sh = base.state
    if shared is not None:
        o_sh, S_sh = _step(S_sh, q, shared.k, shared.v, shared.g, shared.beta)
        o = o + o_sh.to(dt)
    w0, w, js, valid, csum = step_weights(base, u, desc, spec, cached_bias)
    jpos = torch.where(valid, torch.arange(js.shape[1], device=q.device), torch.full_like(js, -1))
    jpos = jpos[:, None].expand_as(w)
    if spec.aggregation == "ssc":
        w, jpos = compact(w, jpos, spec.top_k_segments)
    N = st.cached.shape[1]
    y = w0[..., None] * o
    if N:
        jsel = js[:, None].expand(-1, H, -1).gather(2, jpos.clamp(min=0))  # (B, H, J') boundaries read
        slot = torch.arange(B, device=q.device)[:, None, None] * N + cache_slot(jsel, spec.segmentation)
        r_idx = (slot[..., None] * st.cached.shape[2] + memories[:, None, None, :]).flatten(2)  # (B, H, J' k)
        r_idx = torch.where((jpos >= 0).repeat_interleave(kk, -1), r_idx, torch.full_like(r_idx, -1))
        w_r = (w[..., None] * weights.to(dt)[:, None, None, :]).flatten(2)
        table = st.cached.reshape(-1, *st.cached.shape[3:])
        y = y + state_reads(q.to(dt), table, w_r, r_idx)
        if shared is not None:
            sh_idx = torch.where(jpos >= 0, slot, torch.full_like(slot, -1))
            y = y + state_reads(q.to(dt), base.cached.reshape(-1, *base.cached.shape[2:]), w, sh_idx)
    cached, _ = push_completed(st.cached, base.csum_at, base.n, spec, st.states, csum)
    cached_sh, csum_at = push_completed(base.cached, base.csum_at, base.n, spec, S_sh, csum)
    new_base = CachingState(state=S_sh, cached=cached_sh, csum_at=csum_at, csum=csum, n=base.n + 1)
    return y.to(q.dtype), MoMCachingState(base=new_base, states=st.states, cached=cached)
