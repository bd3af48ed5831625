"""Sparse routing without (T x m) tensors: `topk_route` against the literal `route`, and `linear_at_rows` (rows
of a projection from gathered weight rows) against the full projection then a gather. fp64, fresh random inputs.
"""

import pytest
import torch

from fm_kernels.fm.routing import linear_at_rows, linear_at_rows_reference, route, topk_route


@pytest.mark.parametrize("m,k", [(8, 1), (8, 7), (8, 8), (5, 3)])  # k = 1, k = m - 1, k = m
@pytest.mark.parametrize("tau", [1.0, 0.37])
def test_topk_route_equals_route_fp64(m, k, tau):
    """Same rows and weights as the softmax over all m, top-k and renormalisation; same logit gradients."""
    gen = torch.Generator().manual_seed(10 * m + k)
    logits = (torch.randn(2, 7, 3, m, dtype=torch.float64, generator=gen) * 3).requires_grad_(True)
    w = torch.randn(2, 7, 3, k, dtype=torch.float64, generator=gen)

    rows, a_k = topk_route(logits, k, tau)
    assert rows.shape == a_k.shape == (2, 7, 3, k) and rows.dtype == torch.int64 and a_k.dtype == torch.float64
    (grad,) = torch.autograd.grad((a_k * w).sum(), logits)

    a, alpha, rows_ref = route(logits / tau, k)
    if rows_ref is None:  # k = m: route keeps every row; compare in topk_route's order
        rows_ref = alpha.argsort(-1, descending=True)
    assert torch.equal(rows, rows_ref)
    a_ref = a.gather(-1, rows)
    (grad_ref,) = torch.autograd.grad((a_ref * w).sum(), logits)
    torch.testing.assert_close(a_k, a_ref, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(a_k.sum(-1), torch.ones(2, 7, 3, dtype=torch.float64))
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)
    unkept = torch.ones_like(logits, dtype=torch.bool).scatter(-1, rows, False)
    assert torch.equal(grad[unkept], torch.zeros_like(grad[unkept]))  # no gradient outside the kept rows


def test_topk_route_keeps_low_precision_logits_order_and_upcasts():
    logits = torch.randn(4, 9, 16).to(torch.bfloat16)
    rows, a_k = topk_route(logits, 4, tau=0.5)
    assert a_k.dtype == torch.float32
    a, _, rows_ref = route(logits / 0.5, 4)
    torch.testing.assert_close(a.gather(-1, rows), a_k, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits.gather(-1, rows), logits.gather(-1, rows_ref), rtol=0, atol=0)


def test_topk_route_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=0"):
        topk_route(torch.randn(2, 4), 0)
    with pytest.raises(ValueError, match="k=5"):
        topk_route(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match="tau=0"):
        topk_route(torch.randn(2, 4), 2, tau=0.0)


LINEAR_CASES = [  # (leading dims, d_in, R, c, max_block_elements)
    ((2, 7), 5, 12, 3, 1 << 26),  # one block
    ((2, 7), 5, 12, 3, 3 * 5 * 4),  # blocks of 4 tokens: 14 is not a multiple
    ((3, 5), 4, 6, 1, 1),  # c = 1, one token per block
    ((1, 9), 3, 6, 6, 6 * 3 * 2),  # c = R: every row (in a random order per token)
    ((13,), 8, 10, 4, 4 * 8 * 5),  # one leading dim
]


@pytest.mark.parametrize("lead,d,R,c,max_block", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_at_rows_matches_full_projection_fp64(lead, d, R, c, max_block, with_bias):
    gen = torch.Generator().manual_seed(R * 100 + c * 10 + d)
    x = torch.randn(*lead, d, dtype=torch.float64, generator=gen)
    weight = torch.randn(R, d, dtype=torch.float64, generator=gen)
    bias = torch.randn(R, dtype=torch.float64, generator=gen) if with_bias else None
    if c == R:
        index = torch.rand(*lead, R, generator=gen).argsort(-1)
    else:  # rows repeat across tokens (and may repeat within a token: the op does not need distinct rows)
        index = torch.randint(0, R, (*lead, c), generator=gen)
    w_out = torch.randn(*lead, c, dtype=torch.float64, generator=gen)
    leaves = [x, weight] + ([bias] if with_bias else [])

    def run(fn, **kw):
        ins = [t.clone().requires_grad_(True) for t in leaves]
        out = fn(ins[0], ins[1], index, ins[2] if with_bias else None, **kw)
        (out * w_out).sum().backward()
        return [out] + [t.grad for t in ins]

    got = run(linear_at_rows, max_block_elements=max_block)
    want = run(linear_at_rows_reference)
    assert got[0].shape == (*lead, c)
    for name, g, w in zip(["out", "d x", "d weight", "d bias"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda s, n=name: f"{n}: {s}")


def test_linear_at_rows_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.randint(0, 7, (2, 3, 2), generator=gen)
    fn = lambda x, w, b: linear_at_rows(x, w, index, b, max_block_elements=2 * 4 * 2)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_linear_at_rows_low_precision():
    """bf16 inputs: output in bf16, weight/bias gradients accumulated in fp32 then rounded, near the fp32 values."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=gen)
    weight = torch.randn(16, 32, generator=gen) / 4
    bias = torch.randn(16, generator=gen)
    index = torch.randint(0, 16, (64, 4), generator=gen)
    ins = [t.to(torch.bfloat16).requires_grad_(True) for t in (x, weight, bias)]
    out = linear_at_rows(ins[0], ins[1], index, ins[2], max_block_elements=4 * 32 * 10)
    out.float().sum().backward()
    ref = [t.to(torch.bfloat16).float().requires_grad_(True) for t in (x, weight, bias)]
    out_ref = linear_at_rows_reference(ref[0], ref[1], index, ref[2])
    out_ref.sum().backward()
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in ins)
    torch.testing.assert_close(out.float(), out_ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(ins, ref):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=2e-2, atol=2e-2 * float(want.grad.abs().max()))


def test_linear_at_rows_checks_shapes():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="leading dims"):
        linear_at_rows(x, w, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        linear_at_rows(x, torch.randn(5, 3), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="bias must be"):
        linear_at_rows(x, w, torch.zeros(3, 1, dtype=torch.long), torch.randn(4))
