"""The gated delta rule's chunked (WY / UT-transform) path and the variable-length chunk engine behind it, against
the per-step references: values, final states and gradients, documents, initial states, ragged chunks."""

import pytest
import torch
import torch.nn.functional as F

from fm_kernels.gated import naive_gated_recurrence
from fm_kernels.gated.naive import document_index
from fm_kernels.gated_delta import chunk_gated_delta, gated_delta_step, naive_gated_delta
from fm_kernels.varlen import build_layout, from_chunks, to_chunks, varlen_chunk_scan
from tests.helpers.mixer_checks import random_docs


def delta_inputs(B, H, T, K, V, dtype, gen):
    """Fresh inputs as the layer makes them: L2-normalised keys, beta in (0, 1), log-decays in (-2, 0)."""
    q = torch.randn(B, H, T, K, dtype=dtype, generator=gen)
    k = F.normalize(torch.randn(B, H, T, K, dtype=dtype, generator=gen), dim=-1)
    v = torch.randn(B, H, T, V, dtype=dtype, generator=gen)
    g = -2 * torch.rand(B, H, T, dtype=dtype, generator=gen)
    beta = torch.rand(B, H, T, dtype=dtype, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 8), (37, 16)])
@pytest.mark.parametrize("n_bounds", [0, 3])
def test_chunk_matches_naive_fp64(T, chunk, n_bounds):
    gen = torch.Generator().manual_seed(T * 31 + chunk + n_bounds)
    q, k, v, g, beta = delta_inputs(2, 3, T, 5, 4, torch.float64, gen)
    doc = random_docs(2, T, min(n_bounds, T - 1), gen) if T > 1 else None
    s0 = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=gen)
    o_ref, f_ref = naive_gated_delta(q, k, v, g, beta, doc, s0, output_final_state=True)
    o, f = chunk_gated_delta(q, k, v, g, beta, doc, s0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    assert chunk_gated_delta(q, k, v, g, beta, doc, chunk_size=chunk)[1] is None


def test_chunk_matches_naive_fp32_and_documents_on_chunk_edges():
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta = delta_inputs(1, 2, 40, 8, 8, torch.float32, gen)
    doc = torch.tensor([[0] * 8 + [1] * 8 + [2] + [3] * 7 + [4] + [5] * 15])  # starts on edges, 1-token documents
    ref = naive_gated_delta(*(x.double() for x in (q, k, v, g, beta)), doc, output_final_state=True)
    o, f = chunk_gated_delta(q, k, v, g, beta, doc, output_final_state=True, chunk_size=8)
    assert o.dtype == torch.float32 and f.dtype == torch.float32
    torch.testing.assert_close(o.double(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.double(), ref[1], rtol=1e-4, atol=1e-4)


def test_gradients_match_naive():
    gen = torch.Generator().manual_seed(11)
    inputs = [
        *delta_inputs(2, 2, 19, 4, 3, torch.float64, gen),
        torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=gen),
    ]
    doc = random_docs(2, 19, 2, gen)
    w_o = torch.randn(2, 2, 19, 3, dtype=torch.float64, generator=gen)
    w_f = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=gen)

    def grads(fn, **kw):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        o, f = fn(*leaves[:5], doc, leaves[5], output_final_state=True, **kw)
        ((o * w_o).sum() + (f * w_f).sum()).backward()
        return [x.grad for x in leaves]

    names = ["q", "k", "v", "g", "beta", "initial_state"]
    for name, got, want in zip(names, grads(chunk_gated_delta, chunk_size=8), grads(naive_gated_delta)):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda s, n=name: f"d {n}: {s}")


def test_step_continues_chunked_state():
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta = delta_inputs(2, 2, 12, 4, 4, torch.float64, gen)
    o_full, _ = naive_gated_delta(q, k, v, g, beta)
    _, state = chunk_gated_delta(*(x[:, :, :7] for x in (q, k, v, g, beta)), output_final_state=True, chunk_size=4)
    for t in range(7, 12):
        o_t, state = gated_delta_step(state, q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t])
        torch.testing.assert_close(o_t, o_full[:, :, t], rtol=1e-10, atol=1e-10)


def test_beta_one_overwrites_the_key_direction():
    """With beta = 1 and a unit key, the delta rule replaces what the key retrieves: S_t^T k_t = v_t exactly."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, g, _ = delta_inputs(1, 1, 9, 4, 3, torch.float64, gen)
    o, _ = chunk_gated_delta(k, k, v, g, torch.ones(1, 1, 9, dtype=torch.float64), chunk_size=4)
    torch.testing.assert_close(o, v, rtol=1e-12, atol=1e-12)


# ---- the variable-length engine: sequences of any length, one state each -------------------------------------


@pytest.mark.parametrize("delta", [False, True])
def test_varlen_sequences_equal_each_sequence_alone(delta):
    """Items of 4 sequences (one empty, one shorter than a chunk, documents inside one), each with its own initial
    state: every sequence's reads and final state == the per-step reference on that sequence alone; the empty
    sequence keeps its initial state bit for bit."""
    gen = torch.Generator().manual_seed(3 + delta)
    H, K, V, C = 2, 4, 3, 4
    lengths, n_seq = [9, 0, 3, 14], 4
    docs = [torch.zeros(9, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(3, dtype=torch.long),
            torch.tensor([0] * 5 + [1] * 4 + [2] * 5)]  # fmt: skip
    P = sum(lengths)
    seq = torch.repeat_interleave(torch.arange(n_seq), torch.tensor(lengths))
    layout = build_layout(seq, torch.cat(docs), n_seq, C)
    q, k, v, g, beta = (x[0].transpose(0, 1) for x in delta_inputs(1, H, P, K, V, torch.float64, gen))  # (P, H, .)
    g_items = g if delta else -torch.rand(P, H, K, dtype=torch.float64, generator=gen)
    s0 = torch.randn(n_seq, H, K, V, dtype=torch.float64, generator=gen)
    res = varlen_chunk_scan(
        q=to_chunks(q, layout), k=to_chunks(k, layout), v=to_chunks(v, layout), g=to_chunks(g_items, layout),
        layout=layout, beta=to_chunks(beta, layout) if delta else None, initial_state=s0,
        final_doc=torch.tensor([0, 0, 0, 2]), output_final_state=True,
    )  # fmt: skip
    o = from_chunks(res.o, layout)
    start = 0
    for s, n in enumerate(lengths):
        sl = slice(start, start + n)
        start += n
        if n == 0:
            assert torch.equal(res.final_state[s], s0[s])
            continue

        def head_major(x, sl=sl):  # (1, H, n, .)
            return x[sl].transpose(0, 1)[None]

        doc = docs[s][None]
        if delta:
            ref_o, ref_f = naive_gated_delta(*(head_major(x) for x in (q, k, v, g, beta)), doc, s0[s : s + 1], True)
        else:
            ref_o, ref_f = naive_gated_recurrence(
                *(head_major(x) for x in (q, k, v, g_items)), doc, s0[s : s + 1], True
            )
        torch.testing.assert_close(o[sl].transpose(0, 1), ref_o[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res.final_state[s], ref_f[0], rtol=1e-10, atol=1e-10)


def test_dense_layout_document_index_need_not_increase():
    """Ids 5 5 2 2 5 are three documents on every path (a document starts wherever the id changes)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, g, beta = delta_inputs(1, 1, 10, 3, 2, torch.float64, gen)
    ids = torch.tensor([[5] * 3 + [2] * 4 + [5] * 3])
    o_ids, _ = chunk_gated_delta(q, k, v, g, beta, ids, chunk_size=4)
    o_idx, _ = chunk_gated_delta(q, k, v, g, beta, document_index(ids, 1, 10, ids.device), chunk_size=4)
    torch.testing.assert_close(o_ids, o_idx, rtol=0, atol=0)
    o_ref, _ = naive_gated_delta(q, k, v, g, beta, ids)
    torch.testing.assert_close(o_ids, o_ref, rtol=1e-10, atol=1e-10)
