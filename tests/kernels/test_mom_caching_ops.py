"""Memory Caching over Mixture-of-Memories ops: the parallel path (routed memories' cached states from the chunk
entry states of a unit-aligned varlen scan, one `state_reads` call) against the per-token reference for residual,
GRM and SSC x constant/log segmentation, gated and gated-delta inner rules, with and without the shared memory,
k = 1 and k = M, documents inside a sequence; gradients; fp32; decoding with a growing cache; the identities (GRM
with cached gates at 0 and one segment are plain MoM); a memory no token routes to is never read."""

import math

import pytest
import torch
import torch.nn.functional as F

from fm_kernels.caching import (
    CachingSpec,
    SharedInputs,
    mom_cache_bytes,
    mom_caching,
    mom_caching_step,
    naive_mom_caching,
)
from fm_kernels.caching.segments import n_slots
from fm_kernels.gated import naive_gated_recurrence
from fm_kernels.gated_delta import naive_gated_delta
from fm_kernels.mom import canonical_routing, group_pairs, naive_mom

# T = 19: not a multiple of the unit (4) or the chunk (2); row 0 has a one-token document (position 7).
DOC = torch.tensor([[0] * 7 + [1] + [2] * 11, [0] * 19])


def inputs(B, M, H, T, K, V, D, k, delta, shared, dtype, gen):
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=gen)  # noqa: E731
    kk = r(B, M, H, T, K)
    kk = F.normalize(kk, dim=-1) if delta else kk
    g = -torch.rand((B, M, H, T) if delta else (B, M, H, T, K), dtype=dtype, generator=gen)
    beta = torch.rand(B, M, H, T, dtype=dtype, generator=gen) if delta else None
    vals, mem = r(B, T, M).topk(k, dim=-1)
    mem, w = canonical_routing(mem, torch.softmax(vals, dim=-1))
    x = dict(q=r(B, H, T, K), k=kk, v=r(B, M, H, T, V), g=g, beta=beta, weights=w, u=r(B, H, T, D), desc=r(B, H, T, D))
    if shared:
        x.update(
            k_sh=F.normalize(r(B, H, T, K), dim=-1) if delta else r(B, H, T, K),
            v_sh=r(B, H, T, V),
            g_sh=-torch.rand((B, H, T) if delta else (B, H, T, K), dtype=dtype, generator=gen),
            b_sh=torch.rand(B, H, T, dtype=dtype, generator=gen) if delta else None,
        )
    return x, mem


def _shared(x):
    return SharedInputs(x["k_sh"], x["v_sh"], x["g_sh"], x.get("b_sh")) if "k_sh" in x else None


def reference(x, mem, spec, doc=None, **kw):
    return naive_mom_caching(x["q"], x["k"], x["v"], x["g"], mem, x["weights"], x["u"], x["desc"], spec,
                             beta=x["beta"], shared=_shared(x), doc_ids=doc, **kw)  # fmt: skip


def fast(x, mem, spec, doc=None, chunk=2, **kw):
    B, M, H, T, _ = x["k"].shape
    pairs = group_pairs(mem, M, doc, chunk=chunk)
    b, t = pairs.token // T, pairs.token % T
    at = lambda y: None if y is None else y[b, pairs.memory, :, t]  # noqa: E731 (P, H, .)
    return mom_caching(pairs, x["q"], at(x["k"]), at(x["v"]), at(x["g"]), x["weights"], x["u"], x["desc"], spec,
                       beta=at(x["beta"]), shared=_shared(x), chunk_size=chunk, **kw)  # fmt: skip


def t_slice(x, sl):
    """x at times sl (dim 2 of (B, H, T, .), dim 3 of (B, M, H, T, .), dim 1 of the routing)."""
    out = {}
    for name, y in x.items():
        if y is None:
            out[name] = None
        elif name in ("k", "v", "g", "beta"):
            out[name] = y[:, :, :, sl]
        elif name == "weights":
            out[name] = y[:, sl]
        else:
            out[name] = y[:, :, sl]
    return out


CASES = [  # (aggregation, segmentation, delta, shared, M, k)
    ("residual", "constant", False, True, 3, 2),
    ("residual", "log", True, False, 3, 1),
    ("grm", "constant", True, True, 3, 3),  # k = M
    ("grm", "log", False, False, 4, 2),
    ("ssc", "constant", False, False, 3, 1),  # k = 1
    ("ssc", "log", True, True, 4, 2),
    ("grm", "constant", False, True, 4, 1),
    ("ssc", "constant", True, False, 3, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-{}-{}-shared{}-M{}k{}".format(*c[:2], "gd" if c[2] else "gla",
                                                                                       *c[3:]))  # fmt: skip
def test_parallel_equals_per_token_reference_fp64(case):
    agg, seg, delta, shared, M, k = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x, mem = inputs(2, M, 2, 19, 3, 4, 3, k, delta, shared, torch.float64, gen)
    spec = CachingSpec(agg, seg, 4, "checkpoint", 2)
    ref = reference(x, mem, spec, DOC)
    y, _ = fast(x, mem, spec, DOC)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    y4, _ = fast(x, mem, spec, DOC, chunk=4)  # chunk = unit
    torch.testing.assert_close(y4, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [("grm", "constant", True, True), ("ssc", "log", False, True),
                                  ("residual", "constant", False, False)], ids=str)  # fmt: skip
def test_gradients_match_reference(case):
    agg, seg, delta, shared = case
    gen = torch.Generator().manual_seed(7 + delta)
    x, mem = inputs(2, 3, 2, 15, 3, 2, 3, 2, delta, shared, torch.float64, gen)
    doc = DOC[:, :15]
    spec = CachingSpec(agg, seg, 4, "checkpoint", 2)
    w_out = torch.randn(2, 2, 15, 2, dtype=torch.float64, generator=gen)
    names = [n for n, t in x.items() if t is not None]

    def grads(fn):
        leaves = {n: (t.clone().requires_grad_(True) if n in names else t) for n, t in x.items()}
        y = fn(leaves, mem, spec, doc)
        y = y[0] if isinstance(y, tuple) else y
        (y * w_out).sum().backward()
        return {n: leaves[n].grad for n in names}

    got, want = grads(fast), grads(reference)
    for name in names:
        if agg == "residual" and name in ("u", "desc"):
            assert want[name] is None or want[name].abs().max() == 0
            continue
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=lambda s, n=name: f"d {n}: {s}")


def test_fp32_is_close_to_fp64():
    gen = torch.Generator().manual_seed(3)
    x, mem = inputs(2, 4, 2, 30, 8, 8, 4, 2, True, True, torch.float32, gen)
    spec = CachingSpec("grm", "constant", 8, "checkpoint", 2)
    y, _ = fast(x, mem, spec, chunk=4)
    ref = reference({n: None if t is None else (t.double() if t.is_floating_point() else t) for n, t in x.items()},
                    mem, spec)  # fmt: skip
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("agg,seg,delta,shared", [("grm", "constant", True, True), ("ssc", "log", False, False),
                                                  ("residual", "constant", False, True)])  # fmt: skip
def test_decoding_continues_the_parallel_path_with_a_growing_cache(agg, seg, delta, shared):
    gen = torch.Generator().manual_seed(11 + delta)
    B, M, H, T, k = 2, 4, 2, 21, 2
    x, mem = inputs(B, M, H, T, 3, 4, 3, k, delta, shared, torch.float64, gen)
    doc = torch.tensor([[0] * 3 + [1] * 18, [0] * 21])  # row 0's last document starts at 3
    spec = CachingSpec(agg, seg, 4, "checkpoint", 2)
    ref = reference(x, mem, spec, doc)
    P0 = 9
    y, st = fast(t_slice(x, slice(0, P0)), mem[:, :P0], spec, doc[:, :P0], output_state=True)
    torch.testing.assert_close(y, ref[:, :, :P0], rtol=1e-10, atol=1e-10)
    sizes = [st.cached.shape[1]]
    rows = torch.arange(B)[:, None]
    for t in range(P0, T):
        m_t = mem[:, t]
        at = lambda y, t=t, m_t=m_t: None if y is None else y[rows, m_t, :, t]  # noqa: E731 (B, k, H, .)
        sh = None
        if shared:
            sh = SharedInputs(x["k_sh"][:, :, t], x["v_sh"][:, :, t], x["g_sh"][:, :, t],
                              None if x["b_sh"] is None else x["b_sh"][:, :, t])  # fmt: skip
        before = st.states.clone()
        routed = (at(x["k"]), at(x["v"]), at(x["g"]))
        y_t, st = mom_caching_step(st, m_t, x["weights"][:, t], x["q"][:, :, t], *routed, x["u"][:, :, t],
                                   x["desc"][:, :, t], spec, beta=at(x["beta"]), shared=sh)  # fmt: skip
        torch.testing.assert_close(y_t, ref[:, :, t], rtol=1e-10, atol=1e-10)
        untouched = torch.ones(B, M, dtype=torch.bool).scatter(1, m_t, False)
        assert torch.equal(st.states[untouched], before[untouched])
        sizes.append(st.cached.shape[1])
    # one more cached MoM state per completed segment (row 1); log: one per bit level
    assert sizes[-1] == n_slots(21 // 4, seg) and sorted(sizes) == sizes
    assert st.cached.shape[2] == M and mom_cache_bytes(st) > 0


@pytest.mark.parametrize("delta,shared", [(False, True), (True, False)])
def test_grm_with_cached_gates_at_zero_and_one_segment_are_plain_mom(delta, shared):
    gen = torch.Generator().manual_seed(5)
    M, k = 3, 2
    x, mem = inputs(2, M, 2, 19, 3, 4, 3, k, delta, shared, torch.float64, gen)
    dense_w = torch.zeros(2, 19, M, dtype=torch.float64).scatter(-1, mem, x["weights"])
    base = naive_mom(x["q"], x["k"], x["v"], x["g"], dense_w, x["beta"], DOC)[0]
    if shared:
        sh = _shared(x)
        base = base + (naive_gated_delta(x["q"], sh.k, sh.v, sh.g, sh.beta, DOC)[0] if delta
                       else naive_gated_recurrence(x["q"], sh.k, sh.v, sh.g, DOC)[0])  # fmt: skip
    grm = CachingSpec("grm", "constant", 4, "checkpoint", 2)
    y_off, _ = fast(x, mem, grm, DOC, cached_bias=-math.inf)
    torch.testing.assert_close(y_off, base, rtol=1e-10, atol=1e-10)
    y_on, _ = fast(x, mem, grm, DOC)
    assert not torch.allclose(y_on, base)
    for agg in ("residual", "grm"):  # a unit as long as the sequence: nothing is ever cached
        y_one, _ = fast(x, mem, CachingSpec(agg, "constant", 32, "checkpoint", 2), DOC)
        torch.testing.assert_close(y_one, base, rtol=1e-10, atol=1e-10)


def test_a_memory_no_token_routes_to_is_never_read():
    """Memory 2 gets no token: its inputs get no gradient, changing them changes nothing, and its cached states
    (decoding state) stay zero; a memory routed only in an earlier document is zero in the later one's cache."""
    gen = torch.Generator().manual_seed(9)
    B, M, T = 2, 4, 17
    x, _ = inputs(B, M, 2, T, 3, 3, 3, 2, False, True, torch.float64, gen)
    second = 1 + 2 * (torch.rand(B, T, generator=gen) < 0.5).long()  # memory 1 or 3
    mem = torch.stack([torch.zeros(B, T, dtype=torch.long), second], dim=-1)
    doc = torch.tensor([[0] * 5 + [1] * 12, [0] * 17])
    spec = CachingSpec("residual", "constant", 4, "checkpoint", 2)
    mem[0, :5, 1] = 3
    mem[0, 5:, 1] = 1  # row 0: memory 3 only in document 0
    y, st = fast(x, mem, spec, doc, output_state=True)
    torch.testing.assert_close(y, reference(x, mem, spec, doc), rtol=1e-10, atol=1e-10)
    x2 = dict(x, k=x["k"].clone(), v=x["v"].clone())
    x2["k"][:, 2] += 1.0
    x2["v"][:, 2] += 1.0
    assert torch.equal(fast(x2, mem, spec, doc)[0], y)
    assert torch.equal(st.cached[:, :, 2], torch.zeros_like(st.cached[:, :, 2]))
    assert torch.equal(st.states[:, 2], torch.zeros_like(st.states[:, 2]))
    assert torch.equal(st.cached[0, :, 3], torch.zeros_like(st.cached[0, :, 3]))
    assert st.cached[1, :, 3].abs().max() > 0


def test_independent_state_mode_is_refused():
    gen = torch.Generator().manual_seed(1)
    x, mem = inputs(1, 2, 1, 5, 2, 2, 2, 1, False, False, torch.float64, gen)
    with pytest.raises(ValueError, match="model.memory_caching.state_mode"):
        fast(x, mem, CachingSpec("grm", "constant", 4, "independent", 2))
