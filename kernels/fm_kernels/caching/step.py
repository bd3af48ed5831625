"""One decoding token of Memory Caching: the online memory's step, reads of the token's cached states, and the
cache taking a state whenever a segment completes (same rules as `naive.py`): constant segmentation appends it
(one more slot per segment), log segmentation overwrites its bit level's slot (`segments.cache_slot`), so the
cache holds O(log L) states."""

from __future__ import annotations

import torch

from ..gated.naive import gated_recurrence_step
from ..gated_delta.naive import gated_delta_step
from .chunk import CachingState, compact
from .naive import CachingSpec, mix_weights
from .reads import state_reads
from .segments import boundaries, cache_slot, csum_slot, n_slots, segment_start, width_for


def cache_bytes(state: CachingState) -> int:
    """Bytes held by a row-batched cache: the online state, the cached states and their descriptor sums."""
    return sum(t.numel() * t.element_size() for t in (state.state, state.cached, state.csum_at, state.csum))


def empty_state(B: int, H: int, K: int, V: int, D: int, dtype: torch.dtype, device) -> CachingState:
    z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    return CachingState(state=z(B, H, K, V), cached=z(B, 0, H, K, V), csum_at=z(B, 1, H, D), csum=z(B, H, D),
                        n=torch.zeros(B, dtype=torch.long, device=device))  # fmt: skip


def caching_step(
    st: CachingState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    desc: torch.Tensor,
    spec: CachingSpec,
    beta: torch.Tensor | None = None,
    read_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    cached_bias: float = 0.0,
) -> tuple[torch.Tensor, CachingState]:
    """One token per row: q, k (B, H, K); v (B, H, V); g (B, H, K) or (B, H); beta (B, H) or None; u, desc (B, H, D);
    read_rows = (q_k, rows) (B, H, k) for sparse FM. Returns y (B, H, V) in q's dtype and the new state (the cached
    states grow by one slot when a row completes a segment)."""
    U = spec.segment_size
    dt = st.state.dtype
    B, H = q.shape[:2]
    n = st.n
    S = st.state
    if spec.state_mode == "independent":  # a new segment starts from zero
        S = S * (~((n % U == 0) & (n > 0))).to(dt)[:, None, None, None]
    if beta is None:
        o, S = gated_recurrence_step(S, q, k, v, g)
    else:
        o, S = gated_delta_step(S, q, k, v, g, beta)
    w0, w, js, valid, csum = step_weights(st, u, desc, spec, cached_bias)
    slots = torch.arange(B, device=q.device)[:, None] * st.cached.shape[1] + cache_slot(js, spec.segmentation)
    index = torch.where(valid, slots, torch.full_like(slots, -1))[:, None, :].expand_as(w)
    if spec.aggregation == "ssc":  # read only the kept segments
        w, index = compact(w, index, spec.top_k_segments)
    table = st.cached.reshape(-1, *st.cached.shape[2:])
    if table.shape[0] == 0:  # nothing cached yet
        cached = o.new_zeros(o.shape, dtype=dt)
    elif read_rows is None:
        cached = state_reads(q.to(dt), table, w, index)
    else:
        cached = state_reads(read_rows[0].to(dt), table, w, index, rows=read_rows[1])
    y = w0[..., None] * o.to(dt) + cached

    cached_states, csum_at = push_completed(st.cached, st.csum_at, n, spec, S, csum)
    return y.to(q.dtype), CachingState(state=S, cached=cached_states, csum_at=csum_at, csum=csum, n=n + 1)


def step_weights(st: CachingState, u: torch.Tensor, desc: torch.Tensor, spec: CachingSpec, cached_bias: float = 0.0):
    """The aggregation weights of one token per row (shared with `mom.mom_caching_step`): u, desc (B, H, D).
    Returns w0 (B, H), w (B, H, J), js (B, J) the cached boundaries (0: none), valid (B, J) and the new running
    sum of desc (B, H, D)."""
    U = spec.segment_size
    dt = st.state.dtype
    n = st.n
    csum = st.csum + desc.to(dt)
    c = n // U
    js = boundaries(c, spec.segmentation, width_for(int(c.max()), spec.segmentation))  # (B, J)
    valid = js > 0
    starts = segment_start(js, spec.segmentation).clamp(min=0)  # (0 where there is no boundary)

    def at(j: torch.Tensor) -> torch.Tensor:  # the descriptor prefix sums at boundaries j (B, J)
        idx = csum_slot(j, spec.segmentation)
        return st.csum_at.gather(1, idx[..., None, None].expand(-1, -1, *st.csum_at.shape[2:]))

    desc_j = (at(js) - at(starts)) / ((js - starts).clamp(min=1) * U).to(dt)[..., None, None]  # (B, J, H, D)
    desc_0 = (csum - at(c[:, None])[:, 0]) / (n - c * U + 1).to(dt)[:, None, None]
    ut = u.to(dt)
    z = torch.einsum("bhd,bjhd->bhj", ut, desc_j)
    z0 = (ut * desc_0).sum(-1)
    valid_h = valid[:, None, :].expand_as(z)
    w0, w = mix_weights(z0, z, valid_h, spec, cached_bias)
    return w0, w, js, valid, csum


def push_completed(cached_states, csum_at, n, spec: CachingSpec, S: torch.Tensor, csum: torch.Tensor):
    """After the token at position n (B,): the rows completing a segment cache S (B, *state) at the slot of boundary
    j = (n + 1) / U in cached_states (B, N, *state) (grown as needed; `segments.cache_slot`) and csum at its slot of
    csum_at (B, N + 1, ...)."""
    B = n.shape[0]
    U = spec.segment_size
    push = (n + 1) % U == 0
    if bool(push.any()):  # host sync: whether any row completes a segment
        j = (n + 1) // U
        need = n_slots(int(j[push].max()), spec.segmentation)
        if need > cached_states.shape[1]:
            grow = need - cached_states.shape[1]
            cached_states = torch.cat([cached_states, cached_states.new_zeros(B, grow, *cached_states.shape[2:])], 1)
            csum_at = torch.cat([csum_at, csum_at.new_zeros(B, grow, *csum_at.shape[2:])], 1)
        rows = push.nonzero(as_tuple=True)[0]
        slot = cache_slot(j[rows], spec.segmentation)
        cached_states = cached_states.index_put((rows, slot), S[rows])
        csum_at = csum_at.index_put((rows, slot + 1), csum[rows])
    return cached_states, csum_at


def empty_like(st):
    """The state of rows that have consumed nothing, with st's shapes: every field zero (cached slots included,
    position 0), recursively through the nested NamedTuples (`CachingState`, `mom.MoMCachingState`)."""
    if isinstance(st, tuple):
        return type(st)._make(empty_like(t) for t in st)
    return torch.zeros_like(st)


def where_rows(mask: torch.Tensor, a, b):
    """Per row: a where mask (B,) else b, field by field of the (nested) NamedTuple states of Memory Caching
    (`CachingState`, `mom.MoMCachingState`); cached-state slots (dim 1) are padded to the longer of the two."""
    if isinstance(a, tuple):
        return type(a)._make(where_rows(mask, x, y) for x, y in zip(a, b))
    if a.dim() >= 2 and a.shape[1] != b.shape[1]:
        n = max(a.shape[1], b.shape[1])
        a, b = (torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], *t.shape[2:])], 1) for t in (a, b))
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)
