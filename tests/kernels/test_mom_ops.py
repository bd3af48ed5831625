"""Mixture-of-Memories ops: the O(k) path (pairs grouped by memory with a stable sort, one variable-length scan per
memory) against the dense per-token reference over all M memories; order independence; untouched memories; the
decode step."""

import pytest
import torch
import torch.nn.functional as F

from fm_kernels.mom import canonical_routing, combine_reads, group_pairs, mom_scan, mom_step, naive_mom
from tests.helpers.mixer_checks import random_docs


def inputs(B, M, H, T, K, V, k, delta, dtype, gen):
    """Every memory's inputs at every token (what the reference needs), a random top-k routing and weights."""
    q = torch.randn(B, H, T, K, dtype=dtype, generator=gen)
    kk = torch.randn(B, M, H, T, K, dtype=dtype, generator=gen)
    if delta:
        kk = F.normalize(kk, dim=-1)
    v = torch.randn(B, M, H, T, V, dtype=dtype, generator=gen)
    g = -torch.rand((B, M, H, T) if delta else (B, M, H, T, K), dtype=dtype, generator=gen)
    beta = torch.rand(B, M, H, T, dtype=dtype, generator=gen) if delta else None
    logits = torch.randn(B, T, M, dtype=dtype, generator=gen)
    vals, mem = logits.topk(k, dim=-1)
    w = torch.softmax(vals, dim=-1)
    return q, kk, v, g, beta, mem, w


def time_slice(q, kk, v, g, beta, sl):
    """The inputs at times sl: q (B, H, T, K) on dim 2, the per-memory tensors (B, M, H, T, ...) on dim 3."""
    return q[:, :, sl], kk[:, :, :, sl], v[:, :, :, sl], g[:, :, :, sl], None if beta is None else beta[:, :, :, sl]


def dense_weights(mem, w, M):
    return torch.zeros(*mem.shape[:-1], M, dtype=w.dtype).scatter(-1, mem, w)


def sparse_forward(q, kk, v, g, beta, mem, w, doc, s0, chunk, M, exclude=None):
    """The O(k) path on the pair inputs gathered from the dense arrays (a layer computes them per pair)."""
    B, H, T, K = q.shape
    mem, w = canonical_routing(mem, w)
    pairs = group_pairs(mem, M, doc, exclude=exclude, chunk=chunk)
    b, t = pairs.token // T, pairs.token % T
    at = lambda x: x[b, pairs.memory, :, t]  # noqa: E731  (P, H, .) from (B, M, H, T, .)
    reads, final = mom_scan(
        pairs, q=q[b, :, t], k=at(kk), v=at(v), g=at(g), beta=None if beta is None else at(beta),
        initial_state=s0, output_final_state=True,
    )  # fmt: skip
    return combine_reads(pairs, reads, w), final


CASES = [  # (T, chunk, M, k, n_bounds)
    (13, 4, 4, 2, 0),
    (13, 4, 4, 2, 3),  # documents
    (9, 8, 3, 1, 2),  # k = 1
    (11, 4, 3, 3, 2),  # k = M: every token writes every memory
    (1, 4, 4, 2, 0),
]


@pytest.mark.parametrize("delta", [False, True], ids=["gla", "gated_delta"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_C{}_M{}_k{}_docs{}".format(*c))
def test_sparse_path_equals_dense_reference_fp64(delta, case):
    T, chunk, M, k, n_bounds = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31 + delta)
    B, H, K, V = 2, 2, 3, 4
    q, kk, v, g, beta, mem, w = inputs(B, M, H, T, K, V, k, delta, torch.float64, gen)
    doc = random_docs(B, T, n_bounds, gen) if n_bounds and T > 1 else None
    s0 = torch.randn(B, M, H, K, V, dtype=torch.float64, generator=gen)
    o_ref, f_ref = naive_mom(q, kk, v, g, dense_weights(mem, w, M), beta, doc, s0, output_final_state=True)
    o, f = sparse_forward(q, kk, v, g, beta, mem, w, doc, s0, chunk, M)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("delta", [False, True], ids=["gla", "gated_delta"])
def test_sparse_path_fp32_and_gradients(delta):
    gen = torch.Generator().manual_seed(21 + delta)
    B, M, H, T, K, V, k = 2, 4, 2, 14, 3, 4, 2
    q, kk, v, g, beta, mem, w = inputs(B, M, H, T, K, V, k, delta, torch.float64, gen)
    doc = random_docs(B, T, 2, gen)
    s0 = torch.randn(B, M, H, K, V, dtype=torch.float64, generator=gen)
    o32, f32 = sparse_forward(*(x.float() if x is not None and x.is_floating_point() else x
                                for x in (q, kk, v, g, beta, mem, w, doc, s0)), 4, M)  # fmt: skip
    o_ref, f_ref = naive_mom(q, kk, v, g, dense_weights(mem, w, M), beta, doc, s0, output_final_state=True)
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f32.double(), f_ref, rtol=1e-4, atol=1e-4)

    w_o = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen)
    w_f = torch.randn(B, M, H, K, V, dtype=torch.float64, generator=gen)
    leaves = [x for x in (q, kk, v, g, beta, w, s0) if x is not None]

    def grads(fn):
        ls = [x.clone().requires_grad_(True) for x in leaves]
        it = iter(ls)
        q_, kk_, v_, g_ = next(it), next(it), next(it), next(it)
        beta_ = next(it) if delta else None
        w_, s0_ = next(it), next(it)
        o, f = fn(q_, kk_, v_, g_, beta_, w_, s0_)
        ((o * w_o).sum() + (f * w_f).sum()).backward()
        return [x.grad for x in ls]

    sparse = grads(lambda q_, kk_, v_, g_, b_, w_, s_: sparse_forward(q_, kk_, v_, g_, b_, mem, w_, doc, s_, 4, M))
    dense = grads(lambda q_, kk_, v_, g_, b_, w_, s_: naive_mom(q_, kk_, v_, g_, dense_weights(mem, w_, M), b_, doc, s_,
                                                                output_final_state=True))  # fmt: skip
    for i, (got, want) in enumerate(zip(sparse, dense)):
        assert want.abs().max() > 0, i
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda s, i=i: f"gradient {i}: {s}")


def test_outputs_do_not_depend_on_the_order_ties_are_broken_in():
    """The same routing with each token's k slots listed in another order gives bit-identical reads and states: the
    slots are canonicalised and the stable sort keeps each memory's tokens in time order."""
    gen = torch.Generator().manual_seed(8)
    B, M, H, T, K, V, k = 2, 5, 2, 17, 3, 3, 3
    q, kk, v, g, beta, mem, w = inputs(B, M, H, T, K, V, k, True, torch.float32, gen)
    doc = random_docs(B, T, 2, gen)
    o1, f1 = sparse_forward(q, kk, v, g, beta, mem, w, doc, None, 4, M)
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(B * T)]).view(B, T, k)
    o2, f2 = sparse_forward(q, kk, v, g, beta, mem.gather(-1, perm), w.gather(-1, perm), doc, None, 4, M)
    assert torch.equal(o1, o2) and torch.equal(f1, f2)
    # The sort is stable: equal sequence ids keep their time order (checked on the grouping itself).
    pairs = group_pairs(canonical_routing(mem, w)[0], M, doc, chunk=4)
    seq = pairs.memory * B + pairs.token // T
    same = seq[1:] == seq[:-1]
    assert bool((pairs.token[1:][same] > pairs.token[:-1][same]).all())


def test_a_memory_no_token_routes_to_is_unchanged_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    B, M, H, T, K, V, k = 2, 4, 2, 12, 3, 3, 2
    q, kk, v, g, beta, mem, w = inputs(B, M, H, T, K, V, k, False, torch.float32, gen)
    second = 1 + 2 * (torch.rand(B, T, generator=gen) < 0.5).long()  # memory 1 or 3: nobody goes to memory 2
    mem = torch.stack([torch.zeros(B, T, dtype=torch.long), second], dim=-1)
    s0 = torch.randn(B, M, H, K, V, generator=gen)
    _, f = sparse_forward(q, kk, v, g, beta, mem, w, None, s0, 4, M)
    assert torch.equal(f[:, 2], s0[:, 2])
    assert not torch.equal(f[:, 0], s0[:, 0])


@pytest.mark.parametrize("delta", [False, True], ids=["gla", "gated_delta"])
def test_decode_steps_continue_the_parallel_path_touching_only_routed_memories(delta):
    gen = torch.Generator().manual_seed(13 + delta)
    B, M, H, T, K, V, k = 2, 4, 2, 10, 3, 4, 2
    q, kk, v, g, beta, mem, w = inputs(B, M, H, T, K, V, k, delta, torch.float64, gen)
    o_ref, f_ref = naive_mom(q, kk, v, g, dense_weights(mem, w, M), beta, output_final_state=True)
    _, state = sparse_forward(*time_slice(q, kk, v, g, beta, slice(0, 6)), mem[:, :6], w[:, :6], None, None, 4, M)
    for t in range(6, T):
        m_t, w_t = canonical_routing(mem[:, t], w[:, t])
        rows = torch.arange(B)[:, None]
        before = state.clone()

        def at(x, rows=rows, m_t=m_t, t=t):
            return x[rows, m_t, :, t]

        o_t = mom_step(state, m_t, w_t, q[:, :, t], at(kk), at(v), at(g), None if beta is None else at(beta))
        torch.testing.assert_close(o_t, o_ref[:, :, t], rtol=1e-10, atol=1e-10)
        untouched = torch.ones(B, M, dtype=torch.bool).scatter(1, m_t, False)
        assert torch.equal(state[untouched], before[untouched])
    torch.testing.assert_close(state, f_ref, rtol=1e-10, atol=1e-10)


def test_excluded_tokens_route_nowhere():
    """Tokens marked excluded (left padding) leave every memory unchanged and read 0."""
    gen = torch.Generator().manual_seed(6)
    B, M, H, T, K, V, k = 2, 3, 1, 8, 2, 2, 2
    q, kk, v, g, beta, mem, w = inputs(B, M, H, T, K, V, k, False, torch.float64, gen)
    exclude = torch.zeros(B, T, dtype=torch.bool)
    exclude[1, :3] = True
    o, f = sparse_forward(q, kk, v, g, beta, mem, w, None, None, 4, M, exclude=exclude)
    row1 = (x[1:] for x in time_slice(q, kk, v, g, beta, slice(3, T)) if x is not None)
    o_alone, f_alone = sparse_forward(*row1, None, mem[1:, 3:], w[1:, 3:], None, None, 4, M)
    assert torch.equal(o[1, :, :3], torch.zeros_like(o[1, :, :3]))
    torch.testing.assert_close(o[1:, :, 3:], o_alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f[1:], f_alone, rtol=1e-12, atol=1e-12)
