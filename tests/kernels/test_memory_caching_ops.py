"""Memory Caching ops: the parallel path (cached states from the chunked scan's boundaries) against the per-token
reference for every aggregation, segmentation and state mode, on the gated and the gated-delta rule; gradients;
decoding with a growing cache; the identities of the issue (GRM with cached gates at 0 and residual with one segment
are the base mixer, SSC keeping every segment is GRM, soup is GRM, log segments are the binary expansion); the
bounded-memory state reads, sparse FM's k-row reads included."""

import math

import pytest
import torch
import torch.nn.functional as F

from fm_kernels.caching import (
    CachingSpec,
    boundaries,
    cache_bytes,
    caching_step,
    memory_caching,
    naive_memory_caching,
    segment_sizes,
    state_reads,
    state_reads_reference,
)
from fm_kernels.caching.chunk import ssc_reads_per_token
from fm_kernels.caching.segments import n_slots
from fm_kernels.gated import naive_gated_recurrence
from fm_kernels.gated_delta import naive_gated_delta

MODES = [("constant", "checkpoint"), ("constant", "independent"), ("log", "checkpoint")]


def mc_inputs(B, H, T, K, V, D, delta, dtype, gen):
    q = torch.randn(B, H, T, K, dtype=dtype, generator=gen)
    k = torch.randn(B, H, T, K, dtype=dtype, generator=gen)
    k = F.normalize(k, dim=-1) if delta else k
    v = torch.randn(B, H, T, V, dtype=dtype, generator=gen)
    g = -torch.rand((B, H, T) if delta else (B, H, T, K), dtype=dtype, generator=gen)
    beta = torch.rand(B, H, T, dtype=dtype, generator=gen) if delta else None
    u = torch.randn(B, H, T, D, dtype=dtype, generator=gen)
    desc = torch.randn(B, H, T, D, dtype=dtype, generator=gen)
    return dict(q=q, k=k, v=v, g=g, beta=beta, u=u, desc=desc)


DOC = torch.tensor([[0] * 9 + [1] * 14, [0] * 23])  # T = 23: not a multiple of the segment (4) or chunk (2)


@pytest.mark.parametrize("delta", [False, True], ids=["gated", "delta"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
@pytest.mark.parametrize("aggregation", ["residual", "grm", "soup", "ssc"])
def test_parallel_equals_per_token_reference(aggregation, mode, delta):
    gen = torch.Generator().manual_seed(hash((aggregation, mode, delta)) % 2**31)
    x = mc_inputs(2, 2, 23, 3, 4, 3, delta, torch.float64, gen)
    spec = CachingSpec(aggregation, mode[0], 4, mode[1], 2)
    ref = naive_memory_caching(**x, spec=spec, doc_ids=DOC)
    y, _ = memory_caching(**x, spec=spec, doc_ids=DOC, chunk_size=2)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 4], ids=["per_token", "per_chunk"])
def test_ssc_reads_per_token_and_per_chunk_agree_with_the_reference(chunk):
    """SSC reads each token's kept segments one by one only when a chunk has more cached segments than
    C top_k_segments (`ssc_reads_per_token`); otherwise every segment per chunk, the unkept with weight 0. T = 23,
    segments of 4 (up to 5 cached), top-2: chunk 1 takes the first way, chunk 4 the second; values and gradients."""
    spec = CachingSpec("ssc", "constant", 4, "checkpoint", 2)
    assert ssc_reads_per_token(spec, 5, chunk) == (chunk == 1)
    gen = torch.Generator().manual_seed(31)
    x = {k: v for k, v in mc_inputs(2, 2, 23, 3, 4, 3, False, torch.float64, gen).items() if v is not None}
    w = torch.randn(2, 2, 23, 4, dtype=torch.float64, generator=gen)
    results = []
    for fn in (lambda **a: memory_caching(**a, chunk_size=chunk)[0], naive_memory_caching):
        leaves = {k: t.clone().requires_grad_(True) for k, t in x.items()}
        y = fn(**leaves, spec=spec, doc_ids=DOC)
        (y * w).sum().backward()
        results.append([y] + [leaves[k].grad for k in x])
    for name, got, want in zip(["y", *x], *results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("delta", [False, True], ids=["gated", "delta"])
@pytest.mark.parametrize("aggregation,mode", [("grm", MODES[0]), ("ssc", MODES[1]), ("residual", MODES[2])])
def test_gradients_match_reference(aggregation, mode, delta):
    gen = torch.Generator().manual_seed(7 + delta)
    x = {k: v for k, v in mc_inputs(2, 2, 17, 3, 2, 3, delta, torch.float64, gen).items() if v is not None}
    doc = torch.tensor([[0] * 6 + [1] * 11, [0] * 17])
    spec = CachingSpec(aggregation, mode[0], 4, mode[1], 2)
    w = torch.randn(2, 2, 17, 2, dtype=torch.float64, generator=gen)

    def grads(fn, **kw):
        leaves = {k: t.clone().requires_grad_(True) for k, t in x.items()}
        y = fn(**leaves, spec=spec, doc_ids=doc, **kw)
        y = y[0] if isinstance(y, tuple) else y
        (y * w).sum().backward()
        return {k: t.grad for k, t in leaves.items()}

    got, want = grads(memory_caching, chunk_size=2), grads(naive_memory_caching)
    for name in x:
        if aggregation == "residual" and name in ("u", "desc"):
            assert want[name] is None or want[name].abs().max() == 0
            continue
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=lambda s, n=name: f"d {n}: {s}")


def test_fp32_is_close_to_fp64():
    gen = torch.Generator().manual_seed(3)
    x = mc_inputs(2, 2, 40, 8, 8, 4, False, torch.float32, gen)
    spec = CachingSpec("ssc", "constant", 8, "checkpoint", 2)
    y, _ = memory_caching(**x, spec=spec, chunk_size=4)
    ref = naive_memory_caching(**{k: None if v is None else v.double() for k, v in x.items()}, spec=spec)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("delta", [False, True], ids=["gated", "delta"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_decoding_continues_the_parallel_path_with_a_growing_cache(mode, delta):
    gen = torch.Generator().manual_seed(11 + delta)
    x = mc_inputs(2, 2, 21, 3, 4, 3, delta, torch.float64, gen)
    spec = CachingSpec("grm", mode[0], 4, mode[1], 2)
    ref = naive_memory_caching(**x, spec=spec)
    head = {k: None if v is None else v[:, :, :6] for k, v in x.items()}
    y, st = memory_caching(**head, spec=spec, chunk_size=2, output_state=True)
    torch.testing.assert_close(y, ref[:, :, :6], rtol=1e-10, atol=1e-10)
    sizes = [st.cached.shape[1]]
    for t in range(6, 21):
        y_t, st = caching_step(st, **{k: None if v is None else v[:, :, t] for k, v in x.items()}, spec=spec)
        torch.testing.assert_close(y_t, ref[:, :, t], rtol=1e-10, atol=1e-10)
        sizes.append(st.cached.shape[1])
    # one more cached state per completed segment; log: one per bit level (segments.cache_slot)
    assert sizes[0] == 1 and sizes[-1] == n_slots(21 // 4, mode[0])
    assert sorted(sizes) == sizes and cache_bytes(st) > 0


def test_log_segmentation_decoding_keeps_one_state_per_bit_level():
    """After c units a log-segmented decoding cache holds bit_length(c) states, not c (the states no later token
    reads are overwritten), and decoding still reads exactly what the per-token reference reads."""
    gen = torch.Generator().manual_seed(5)
    x = mc_inputs(2, 2, 40, 3, 4, 3, False, torch.float64, gen)
    spec = CachingSpec("grm", "log", 1, "checkpoint", 2)
    ref = naive_memory_caching(**x, spec=spec)
    y, st = memory_caching(**{k: None if v is None else v[:, :, :3] for k, v in x.items()}, spec=spec, chunk_size=1,
                           output_state=True)  # fmt: skip
    torch.testing.assert_close(y, ref[:, :, :3], rtol=1e-10, atol=1e-10)
    sizes = [st.cached.shape[1]]
    for t in range(3, 40):
        y_t, st = caching_step(st, **{k: None if v is None else v[:, :, t] for k, v in x.items()}, spec=spec)
        torch.testing.assert_close(y_t, ref[:, :, t], rtol=1e-10, atol=1e-10)
        sizes.append(st.cached.shape[1])
    assert sizes == [(t + 1).bit_length() for t in range(2, 40)]  # 6 states after 40 units, not 40


@pytest.mark.parametrize("delta", [False, True], ids=["gated", "delta"])
def test_grm_with_cached_gates_at_zero_and_one_segment_are_the_base_mixer(delta):
    gen = torch.Generator().manual_seed(5)
    x = mc_inputs(2, 2, 19, 3, 4, 3, delta, torch.float64, gen)
    base = (naive_gated_delta(x["q"], x["k"], x["v"], x["g"], x["beta"], DOC[:, :19])[0] if delta
            else naive_gated_recurrence(x["q"], x["k"], x["v"], x["g"], DOC[:, :19])[0])  # fmt: skip
    grm = CachingSpec("grm", "constant", 4, "checkpoint", 2)
    y_off, _ = memory_caching(**x, spec=grm, doc_ids=DOC[:, :19], chunk_size=2, cached_bias=-math.inf)
    torch.testing.assert_close(y_off, base, rtol=1e-10, atol=1e-10)
    y_on, _ = memory_caching(**x, spec=grm, doc_ids=DOC[:, :19], chunk_size=2)
    assert not torch.allclose(y_on, base)
    for agg in ("residual", "grm"):  # a segment as long as the sequence: nothing is ever cached
        y_one, _ = memory_caching(**x, spec=CachingSpec(agg, "constant", 32, "checkpoint", 2), chunk_size=2)
        torch.testing.assert_close(y_one, naive_memory_caching(**x, spec=CachingSpec(agg, "constant", 32)), rtol=0,
                                   atol=1e-12)  # fmt: skip
        ref = naive_gated_delta(*(x[n] for n in "qkvg"), x["beta"])[0] if delta else naive_gated_recurrence(
            *(x[n] for n in "qkvg"))[0]  # fmt: skip
        torch.testing.assert_close(y_one, ref, rtol=1e-10, atol=1e-10)


def test_ssc_keeping_every_segment_is_grm_and_soup_is_grm():
    gen = torch.Generator().manual_seed(9)
    x = mc_inputs(1, 2, 26, 3, 4, 3, False, torch.float64, gen)
    n_segments = 25 // 4  # cached segments of the last token
    grm = naive_memory_caching(**x, spec=CachingSpec("grm", "constant", 4))
    ssc_all, _ = memory_caching(**x, spec=CachingSpec("ssc", "constant", 4, "checkpoint", n_segments), chunk_size=2)
    torch.testing.assert_close(ssc_all, grm, rtol=1e-10, atol=1e-10)
    ssc_2, _ = memory_caching(**x, spec=CachingSpec("ssc", "constant", 4, "checkpoint", 2), chunk_size=2)
    assert not torch.allclose(ssc_2, grm)
    # Memory soup interpolates the states and reads once; for a linear memory that is GRM's weighted reads.
    soup = naive_memory_caching(**x, spec=CachingSpec("soup", "constant", 4))
    torch.testing.assert_close(soup, grm, rtol=1e-12, atol=1e-12)


def test_log_segmentation_is_the_binary_expansion():
    assert segment_sizes(13, 1, "log") == ([8, 4, 1], 1)
    assert segment_sizes(13 * 4 + 2, 4, "log") == ([32, 16, 4], 3)  # units of 4 tokens, online 3 tokens so far
    assert segment_sizes(6, 1, "constant") == ([1] * 6, 1)
    for c in range(1, 70):
        js = [int(j) for j in boundaries(torch.tensor(c), "log", 7) if j]
        sizes = [b - a for a, b in zip([0, *js], js)]
        assert sum(sizes) == c and len(sizes) == bin(c).count("1")
        assert all(s & (s - 1) == 0 for s in sizes) and sizes == sorted(sizes, reverse=True)


def test_documents_do_not_share_caches():
    gen = torch.Generator().manual_seed(4)
    x = mc_inputs(1, 2, 23, 3, 4, 3, False, torch.float64, gen)
    doc = DOC[:1]
    spec = CachingSpec("grm", "constant", 4, "checkpoint", 2)
    y, _ = memory_caching(**x, spec=spec, doc_ids=doc, chunk_size=2)
    alone, _ = memory_caching(**{k: v[:, :, 9:] for k, v in x.items() if v is not None}, spec=spec, chunk_size=2)
    torch.testing.assert_close(y[:, :, 9:], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_state_reads_match_the_gathering_reference_with_gradients(sparse):
    gen = torch.Generator().manual_seed(2)
    N, H, J, S, K, V, k = 7, 2, 3, 5, 6, 4, 2
    states = torch.randn(S, H, K, V, dtype=torch.float64, generator=gen)
    index = torch.randint(-1, S, (N, H, J), generator=gen)
    weight = torch.rand(N, H, J, dtype=torch.float64, generator=gen)
    rows = torch.stack([torch.randperm(K, generator=gen)[:k] for _ in range(N * H)]).view(N, H, k) if sparse else None
    q = torch.randn(N, H, k if sparse else K, dtype=torch.float64, generator=gen)
    w = torch.randn(N, H, V, dtype=torch.float64, generator=gen)
    results = []
    for fn in (lambda *a: state_reads(*a, max_block_elements=50), state_reads_reference):
        leaves = [t.clone().requires_grad_(True) for t in (q, states, weight)]
        (fn(leaves[0], leaves[1], leaves[2], index, rows) * w).sum().backward()
        results.append([fn(q, states, weight, index, rows)] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if sparse:  # a read touches only the routed rows: other rows of the states get no gradient
        touched = torch.zeros(S, H, K, dtype=torch.bool)
        for n_ in range(N):
            for h in range(H):
                for j in range(J):
                    if index[n_, h, j] >= 0:
                        touched[index[n_, h, j], h, rows[n_, h]] = True
        assert torch.equal(results[0][2].abs().sum(-1) > 0, touched & (results[1][2].abs().sum(-1) > 0))
        assert bool((results[0][2][~touched] == 0).all())


def test_sparse_reads_of_cached_states_equal_dense_reads():
    """Sparse FM: reading the cached states at the token's k rows == the dense read with zero-filled weights."""
    gen = torch.Generator().manual_seed(8)
    B, H, T, m, kk, V, D = 1, 2, 18, 6, 2, 3, 3
    x = mc_inputs(B, H, T, m, V, D, False, torch.float64, gen)
    rows = torch.stack([torch.randperm(m, generator=gen)[:kk] for _ in range(B * H * T)]).view(B, H, T, kk)
    q_k = torch.rand(B, H, T, kk, dtype=torch.float64, generator=gen)
    x["q"] = torch.zeros(B, H, T, m, dtype=torch.float64).scatter(-1, rows, q_k)
    spec = CachingSpec("ssc", "constant", 4, "checkpoint", 2)
    dense, _ = memory_caching(**x, spec=spec, chunk_size=2)
    sparse, _ = memory_caching(**x, spec=spec, chunk_size=2, read_rows=(q_k, rows))
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
