"""The chunked gated recurrence (shared by FM and Mamba-2) against its naive per-step reference."""

import pytest
import torch

from fm_kernels.gated import chunk_gated_recurrence, gated_recurrence_step, naive_gated_recurrence
from tests.helpers.mixer_checks import random_docs


def make_inputs(B, H, T, K, V, scalar, dtype, gen):
    q = torch.randn(B, H, T, K, dtype=dtype, generator=gen)
    k = torch.randn(B, H, T, K, dtype=dtype, generator=gen)
    v = torch.randn(B, H, T, V, dtype=dtype, generator=gen)
    g_shape = (B, H, T) if scalar else (B, H, T, K)
    g = torch.log(torch.rand(g_shape, dtype=dtype, generator=gen).clamp(min=0.05))  # log-decays in [-3, 0)
    return q, k, v, g


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 8), (40, 16), (7, 64)])
@pytest.mark.parametrize("n_bounds", [0, 3])
def test_chunk_matches_naive_fp64(scalar, T, chunk, n_bounds):
    gen = torch.Generator().manual_seed(hash((scalar, T, chunk, n_bounds)) % 2**31)
    q, k, v, g = make_inputs(2, 3, T, 5, 6, scalar, torch.float64, gen)
    doc = random_docs(2, T, min(n_bounds, T - 1), gen) if T > 1 else None
    s0 = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=gen)
    o_ref, f_ref = naive_gated_recurrence(q, k, v, g, doc, s0, output_final_state=True)
    o, f = chunk_gated_recurrence(q, k, v, g, doc, s0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scalar", [False, True])
def test_document_ids_need_not_increase(scalar):
    """A document starts wherever the id changes: ids 5 5 2 2 2 5 5 ... are three documents, not two."""
    gen = torch.Generator().manual_seed(11)
    T = 23
    q, k, v, g = make_inputs(2, 2, T, 4, 3, scalar, torch.float64, gen)
    doc = torch.tensor([[5] * 6 + [2] * 9 + [5] * 8, [1] * 4 + [0] * 4 + [1] * 4 + [0] * 11])
    renumbered = random_docs(2, T, 0, gen)
    renumbered[0, 6:], renumbered[0, 15:] = 1, 2
    renumbered[1, 4:], renumbered[1, 8:], renumbered[1, 12:] = 1, 2, 3
    o_ref, f_ref = naive_gated_recurrence(q, k, v, g, renumbered, output_final_state=True)
    o, f = chunk_gated_recurrence(q, k, v, g, doc, output_final_state=True, chunk_size=4)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scalar", [False, True])
def test_chunk_matches_naive_fp32(scalar):
    gen = torch.Generator().manual_seed(7)
    q, k, v, g = make_inputs(2, 2, 50, 8, 8, scalar, torch.float32, gen)
    doc = random_docs(2, 50, 4, gen)
    o_ref, _ = naive_gated_recurrence(q.double(), k.double(), v.double(), g.double(), doc)
    o, _ = chunk_gated_recurrence(q, k, v, g, doc, chunk_size=16)
    assert o.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scalar", [False, True])
def test_gradients_match_naive(scalar):
    gen = torch.Generator().manual_seed(11)
    inputs = [*make_inputs(2, 2, 19, 4, 3, scalar, torch.float64, gen)]
    inputs.append(torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=gen))
    doc = random_docs(2, 19, 2, gen)
    w_o = torch.randn(2, 2, 19, 3, dtype=torch.float64, generator=gen)
    w_f = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=gen)

    def grads(fn, **kw):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        q, k, v, g, s0 = leaves
        o, f = fn(q, k, v, g, doc, s0, output_final_state=True, **kw)
        ((o * w_o).sum() + (f * w_f).sum()).backward()
        return [x.grad for x in leaves]

    for got, want in zip(grads(chunk_gated_recurrence, chunk_size=8), grads(naive_gated_recurrence)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_gradcheck_small():
    gen = torch.Generator().manual_seed(3)
    q, k, v, g = (x.requires_grad_(True) for x in make_inputs(1, 1, 6, 2, 2, False, torch.float64, gen))
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda *a: chunk_gated_recurrence(*a, doc, chunk_size=4)[0], (q, k, v, g))


def test_step_continues_chunked_state():
    gen = torch.Generator().manual_seed(5)
    q, k, v, g = make_inputs(2, 2, 12, 4, 4, False, torch.float64, gen)
    o_full, _ = naive_gated_recurrence(q, k, v, g)
    _, state = chunk_gated_recurrence(q[:, :, :8], k[:, :, :8], v[:, :, :8], g[:, :, :8], output_final_state=True)
    for t in range(8, 12):
        o_t, state = gated_recurrence_step(state, q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t])
        torch.testing.assert_close(o_t, o_full[:, :, t], rtol=1e-10, atol=1e-10)


def test_strong_decay_stays_finite():
    """Decays near zero (log-decay -30 per step) must not overflow in fp32: every exponent is <= 0."""
    gen = torch.Generator().manual_seed(9)
    q, k, v, _ = make_inputs(1, 1, 64, 4, 4, False, torch.float32, gen)
    g = torch.full((1, 1, 64, 4), -30.0)
    o, f = chunk_gated_recurrence(q, k, v, g, output_final_state=True, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    # With a decay of e^-30 the state is just the current token's outer product.
    torch.testing.assert_close(o, torch.einsum("bhtk,bhtk,bhtv->bhtv", q, k, v), rtol=1e-4, atol=1e-4)
