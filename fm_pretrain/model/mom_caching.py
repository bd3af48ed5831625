"""Memory Caching around a Mixture-of-Memories layer (`model.memory_caching.mixers: [mom]`): the forward that
`MemoryCaching` runs when its base mixer is a `MixtureOfMemories` (docs/memory_family.md).

MoM's state is all M routed memories plus the shared one; in `checkpoint` mode (the only one for MoM) the whole
state is cached at every unit boundary of a document and a token reads its k routed memories (weighted by its
routing weights) and the shared memory in each cached state (`fm_kernels.caching.mom`). The MoM layer gives its
routing (`routing`: balance loss and router statistics included), the shared query, the routed pairs' inputs
(`pair_inputs`, `decode_inputs`) and the shared memory's inputs (`shared_inputs`); the scans and reads run in
`mom_caching` / `mom_caching_step`; the result goes through MoM's own output stage (`out`). Descriptor `keys`: the
shared query q (the one input every memory reads with), so `u` is `d_key` wide.

Generation cache: MoM's conv windows (as the layer's) and "mc", a `fm_kernels.caching.MoMCachingState`;
`mom_cache_bytes(cache["mc"])` reports its size. The first call with a cache runs the parallel path, later calls run
the per-token step, which loads and updates only the k routed memories.
"""

from __future__ import annotations

import torch

from fm_kernels.caching import MoMCachingState, SharedInputs, empty_like, mom_caching, mom_caching_step, where_rows
from fm_pretrain.model.cache import advance, pad_positions


def mom_caching_forward(mc, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None) -> torch.Tensor:
    """`MemoryCaching.forward` for a MoM base: x (B, T, d_model) -> (B, T, d_model)."""
    mom = mc.base
    B, T, _ = x.shape
    pad = pad_positions(cache, T, x.device)
    memories, weights = mom.routing(x)
    q = mom._queries(x, doc_ids, cache, pad)  # (B, T, H, K)
    qh = q.transpose(1, 2)
    H = qh.shape[1]
    if mc.w_u is not None:
        u = mc.w_u(x).view(B, T, H, mc.width).transpose(1, 2)
    else:  # residual: no scores
        u = x.new_zeros(B, H, T, mc.width)
    desc = qh if mc.cfg.descriptor == "keys" else u
    if cache is not None and "mc" in cache:
        o = _steps(mc, x, q, memories, weights, u, desc, doc_ids, cache, pad)
    else:
        docs = doc_ids
        if pad is not None:  # the padding is a document of its own, before the real one
            docs = (~pad).long() if doc_ids is None else doc_ids * 2 + (~pad).long()
        pairs, k, v, g, beta = mom.pair_inputs(x, memories, docs, cache, pad)
        o, st = mom_caching(
            pairs, qh, k, v, g, weights, u, desc, mc.spec, beta=beta, shared=_shared(mom, x, q, doc_ids, cache, pad),
            chunk_size=mom.cfg.chunk_size, output_state=cache is not None,
        )  # fmt: skip
        if cache is not None:
            if pad is not None:  # rows whose prompt has not started yet: an empty cache
                st = where_rows(pad[:, -1], empty_like(st), st)
            cache["mc"] = st
    advance(cache, T)
    return mom.out(o.to(x.dtype), x)


def _shared(mom, x, q, doc_ids, cache, pad) -> SharedInputs | None:
    if mom.shared is None:
        return None
    inp = mom.shared_inputs(x, q, doc_ids, cache, pad)
    return SharedInputs(inp.k, inp.v, inp.g, inp.beta)


def _steps(mc, x, q, memories, weights, u, desc, doc_ids, cache: dict, pad) -> torch.Tensor:
    """Tokens one at a time from cache["mc"] (decoding, or a prefill continued in pieces)."""
    mom = mc.base
    outs = []
    for t in range(x.shape[1]):
        sl = slice(t, t + 1)
        pad_t = None if pad is None else pad[:, sl]
        held = pad_t is not None and bool(pad_t.any())
        if held:  # padding rows keep their state and routed conv windows
            prev, kv_win = _clone(cache["mc"]), cache.get("kv_conv")
            kv_win = None if kv_win is None else kv_win.clone()
        k, v, g, beta = mom.decode_inputs(x[:, sl], memories[:, sl], cache)
        sh = _shared(mom, x[:, sl], q[:, sl], None if doc_ids is None else doc_ids[:, sl], cache, pad_t)
        if sh is not None:
            sh = SharedInputs(*(None if z is None else z[:, :, 0] for z in sh))
        y, st = mom_caching_step(
            cache["mc"], memories[:, t], weights[:, t], q[:, t], k, v, g, u[:, :, t], desc[:, :, t],
            mc.spec, beta=beta, shared=sh,
        )  # fmt: skip
        if held:
            st = where_rows(pad_t[:, 0], prev, st)
            if kv_win is not None:
                cache["kv_conv"] = torch.where(pad_t[:, 0, None, None, None], kv_win, cache["kv_conv"])
        cache["mc"] = st
        outs.append(y)
    return torch.stack(outs, dim=2)


def _clone(st: MoMCachingState) -> MoMCachingState:
    return MoMCachingState(base=st.base, states=st.states.clone(), cached=st.cached)
