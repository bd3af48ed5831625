"""FM ops: chunked dense/sparse paths and decode steps against the literal reference of docs/fm_spec.md."""

import pytest
import torch

from fm_kernels.fm import chunk_fm, fm_step, fm_step_sparse, naive_fm
from fm_kernels.fm.routing import route
from tests.helpers.mixer_checks import random_docs


def fm_inputs(B, H, T, m, d_mem, top_k, dtype, gen):
    """Router weights through the real top-k routing, rates in (0, 1), values: theta, phi, xbar, rows."""
    logits = torch.randn(B, T, H, m, dtype=dtype, generator=gen) * 2
    a, _, rows = route(logits, top_k)
    eta = torch.rand(B, T, H, m, dtype=dtype, generator=gen)
    mu = torch.rand(B, T, H, m, dtype=dtype, generator=gen)
    theta = (eta * a).transpose(1, 2).contiguous()
    phi = (mu * a).transpose(1, 2).contiguous()
    xbar = torch.randn(B, H, T, d_mem, dtype=dtype, generator=gen)
    return theta, phi, xbar, rows


CASES = [  # (heads, m, top_k, d_mem, T, chunk)
    (1, 4, None, 3, 9, 4),
    (2, 8, 1, 4, 21, 8),  # k = 1
    (2, 8, 8, 4, 21, 8),  # k = m (dense through the sparse option)
    (3, 16, 4, 8, 33, 16),
    (2, 32, 8, 4, 17, 64),  # T shorter than a chunk
]


@pytest.mark.parametrize("H,m,top_k,d_mem,T,chunk", CASES)
@pytest.mark.parametrize("n_bounds", [0, 3])
def test_chunk_fm_matches_naive_fp64(H, m, top_k, d_mem, T, chunk, n_bounds):
    gen = torch.Generator().manual_seed(1000 * H + 10 * m + T + n_bounds)
    theta, phi, xbar, _ = fm_inputs(2, H, T, m, d_mem, top_k, torch.float64, gen)
    doc = random_docs(2, T, n_bounds, gen)
    s0 = torch.randn(2, H, m, d_mem, dtype=torch.float64, generator=gen)
    r_ref, f_ref = naive_fm(theta, phi, xbar, doc, s0, output_final_state=True)
    r, f = chunk_fm(theta, phi, xbar, doc, s0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(r, r_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("top_k", [None, 2])
def test_chunk_fm_fp32_loose(top_k):
    gen = torch.Generator().manual_seed(21)
    theta, phi, xbar, _ = fm_inputs(2, 2, 70, 16, 8, top_k, torch.float32, gen)
    doc = random_docs(2, 70, 3, gen)
    r_ref, _ = naive_fm(theta.double(), phi.double(), xbar.double(), doc)
    r, _ = chunk_fm(theta, phi, xbar, doc, chunk_size=32)
    torch.testing.assert_close(r.double(), r_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_chunk_fm_gradients_match_naive(top_k):
    gen = torch.Generator().manual_seed(31)
    base = [*fm_inputs(2, 2, 15, 6, 4, top_k, torch.float64, gen)[:3]]
    base.append(torch.randn(2, 2, 6, 4, dtype=torch.float64, generator=gen))
    doc = random_docs(2, 15, 2, gen)
    w_r = torch.randn(2, 2, 15, 4, dtype=torch.float64, generator=gen)
    w_f = torch.randn(2, 2, 6, 4, dtype=torch.float64, generator=gen)

    def grads(fn, **kw):
        leaves = [x.clone().requires_grad_(True) for x in base]
        r, f = fn(*leaves[:3], doc, leaves[3], output_final_state=True, **kw)
        ((r * w_r).sum() + (f * w_f).sum()).backward()
        return [x.grad for x in leaves]

    for got, want in zip(grads(chunk_fm, chunk_size=4), grads(naive_fm)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_chunk_fm_gradcheck():
    gen = torch.Generator().manual_seed(41)
    theta, phi, xbar, _ = fm_inputs(1, 1, 5, 3, 2, None, torch.float64, gen)
    leaves = [x.requires_grad_(True) for x in (theta, phi, xbar)]
    doc = torch.tensor([[0, 0, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda *a: chunk_fm(*a, doc, chunk_size=2)[0], leaves)


def test_theta_near_one_has_finite_gradients():
    theta = torch.full((1, 1, 8, 4), 1.0, requires_grad=True)
    phi = torch.rand(1, 1, 8, 4)
    xbar = torch.randn(1, 1, 8, 3)
    r, _ = chunk_fm(theta, phi, xbar, chunk_size=4)
    r.sum().backward()
    assert torch.isfinite(r).all() and torch.isfinite(theta.grad).all()
    # theta = 1 overwrites every row with the current value: r_t = sum(phi_t) * xbar_t.
    torch.testing.assert_close(r, phi.sum(-1, keepdim=True) * xbar, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [None, 1, 3, 6])
def test_decode_steps_reproduce_parallel(top_k):
    gen = torch.Generator().manual_seed(51)
    theta, phi, xbar, rows = fm_inputs(2, 3, 12, 6, 4, top_k, torch.float64, gen)
    r_ref, _ = naive_fm(theta, phi, xbar)
    _, state = chunk_fm(theta[:, :, :5], phi[:, :, :5], xbar[:, :, :5], output_final_state=True, chunk_size=4)
    for t in range(5, 12):
        if rows is None:
            r_t, state = fm_step(state, theta[:, :, t], phi[:, :, t], xbar[:, :, t])
        else:
            rows_t = rows[:, t]  # (B, H, k)
            theta_k = theta[:, :, t].gather(-1, rows_t)
            phi_k = phi[:, :, t].gather(-1, rows_t)
            before = state.clone()
            r_t, state = fm_step_sparse(state, rows_t, theta_k, phi_k, xbar[:, :, t])
            untouched = torch.ones_like(state, dtype=torch.bool).scatter(
                2, rows_t.unsqueeze(-1).expand(-1, -1, -1, state.shape[-1]), False
            )
            assert torch.equal(state[untouched], before[untouched]), "a sparse step wrote an unselected row"
        torch.testing.assert_close(r_t, r_ref[:, :, t], rtol=1e-10, atol=1e-10)
