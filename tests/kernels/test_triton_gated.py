"""Triton chunked gated recurrence (FM per-key decays, Mamba-2 scalar decays) against the naive reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) in fp32 at small sizes;
the `gpu` tests run real sizes in bf16 against the fp32 PyTorch chunked path.
"""

from __future__ import annotations

import pytest
import torch

from fm_kernels.fm import fm_log_decay, fm_recurrence
from fm_kernels.gated import chunk_gated_recurrence, naive_gated_recurrence, resolve_backend, triton_available
from fm_kernels.gated.dispatch import ENV_VAR
from fm_kernels.ssd import ssd_chunked, ssd_naive

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (CUDA or TRITON_INTERPRET=1)")


def triton_fn():
    from fm_kernels.gated.chunk_triton import triton_gated_recurrence  # late: triton.jit reads TRITON_INTERPRET

    return triton_gated_recurrence


def inputs(B, H, T, K, V, scalar, gen, device="cpu", dtype=torch.float32, g_min=0.05):
    q, k = (torch.randn(B, H, T, K, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=gen)
    g = torch.log(torch.rand((B, H, T) if scalar else (B, H, T, K), generator=gen).clamp(min=g_min))
    return [x.to(device, dtype) for x in (q, k, v, g)]


def run_with_grads(fn, xs, w_o, w_f, **kw):
    """Forward, then gradients of <o, w_o> + <final, w_f> for every input tensor (None for absent ones)."""
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
    q, k, v, g, h0 = xs
    o, final = fn(q, k, v, g, initial_state=h0, **kw)
    loss = (o.double() * w_o).sum() + (0 if w_f is None else (final.double() * w_f).sum())
    loss.backward()
    return o, final, [None if x is None else x.grad for x in xs]


def close(actual, expected, tol):
    """Elementwise check scaled by the reference's magnitude (the sums here reach tens)."""
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("scalar", [False, True], ids=["per_key", "scalar"])
def test_matches_naive_docs_state_partial_chunks(scalar):
    """T = 50 with chunk 32 (two sub-chunks, ragged last chunk); K, V split into two 16-wide tiles with ragged
    edges; documents starting exactly on the chunk edge (32), a 1-token document (40) and a mid-chunk start."""
    gen = torch.Generator().manual_seed(1 + scalar)
    B, H, T, K, V = 2, 1, 50, 20, 17
    q, k, v, g = inputs(B, H, T, K, V, scalar, gen)
    h0 = torch.randn(B, H, K, V, generator=gen)
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 32:], doc[0, 40], doc[0, 41:] = 1, 2, 3
    doc[1, 7:], doc[1, 45:] = 5, 6
    w_o = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen)
    w_f = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    kw = dict(doc_ids=doc, output_final_state=True)
    o, f, grads = run_with_grads(triton_fn(), [q, k, v, g, h0], w_o, w_f, chunk_size=32, block_size=16, **kw)
    o_ref, f_ref, grads_ref = run_with_grads(
        naive_gated_recurrence, [x.double() for x in (q, k, v, g, h0)], w_o, w_f, **kw
    )
    assert o.dtype == torch.float32 and f.dtype == torch.float32
    close(o, o_ref, 1e-5)
    close(f, f_ref, 1e-5)
    for name, got, ref in zip(["q", "k", "v", "g", "h0"], grads, grads_ref):
        assert got.shape == ref.shape, name
        close(got, ref, 2e-5)


def test_single_document_no_state():
    """No doc_ids, no initial state, no final state: three chunks of 16 (one sub-chunk each), T ragged."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, g = inputs(1, 2, 37, 16, 16, False, gen)
    w_o = torch.randn(1, 2, 37, 16, dtype=torch.float64, generator=gen)
    o, f, grads = run_with_grads(triton_fn(), [q, k, v, g, None], w_o, None, chunk_size=16)
    o_ref, _, grads_ref = run_with_grads(naive_gated_recurrence, [x.double() for x in (q, k, v, g)] + [None], w_o, None)
    assert f is None and grads[4] is None
    close(o, o_ref, 1e-5)
    for got, ref in zip(grads[:4], grads_ref[:4]):
        close(got, ref, 2e-5)


def fm_inputs(B, H, T, m, d, gen, strong: bool):
    """Routing-like theta = eta * softmax, phi = mu * softmax; `strong` pushes some rows' theta to ~1 - 1e-7."""
    logits = torch.randn(B, H, T, m, generator=gen) * (12.0 if strong else 1.0)
    a = torch.softmax(logits, dim=-1)
    eta = torch.sigmoid(torch.randn(B, H, T, 1, generator=gen) + (8.0 if strong else 0.0))
    mu = torch.sigmoid(torch.randn(B, H, T, 1, generator=gen))
    xbar = torch.randn(B, H, T, d, generator=gen)
    return eta * a, mu * a, xbar


def test_fm_recurrence_triton_equals_torch_with_strong_decays():
    """fm_recurrence(backend='triton') == backend='torch' (forward and gradients through theta, phi, xbar),
    with write weights near 1 (log1p(-theta) near its guard) that must stay finite."""
    gen = torch.Generator().manual_seed(4)
    theta, phi, xbar = fm_inputs(1, 2, 40, 16, 16, gen, strong=True)
    assert theta.max() > 1 - 1e-4 and torch.isfinite(fm_log_decay(theta)).all()
    doc = torch.zeros(1, 40, dtype=torch.long)
    doc[:, 23:] = 1
    w = torch.randn(1, 2, 40, 16, dtype=torch.float64, generator=gen)
    results = {}
    for backend in ("triton", "torch"):
        xs = [x.clone().requires_grad_() for x in (theta, phi, xbar)]
        r, _ = fm_recurrence(*xs, doc_ids=doc, chunk_size=16, backend=backend)
        (r.double() * w).sum().backward()
        results[backend] = [r] + [x.grad for x in xs]
    for got in results["triton"]:
        assert torch.isfinite(got).all()
    # d loss / d theta carries d log1p(-theta) / d theta = -1 / (1 - theta) (~1e4 here): both fp32 paths agree
    # to ~1e-6 of d loss / d g (fp64-checked in the tests above), so compare theta's gradient times (1 - theta).
    results["triton"][1], results["torch"][1] = ((1 - theta) * r[1] for r in (results["triton"], results["torch"]))
    for got, ref in zip(results["triton"], results["torch"]):
        close(got, ref, 2e-5)


def test_ssd_triton_matches_naive():
    """Mamba-2 SSD (scalar decay per head, grouped B/C, D skip) through the Triton kernels."""
    gen = torch.Generator().manual_seed(5)
    b, T, H, P, G, N = 1, 24, 2, 16, 1, 16
    x = torch.randn(b, T, H, P, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, T, H, generator=gen))
    A = -torch.rand(H, generator=gen) - 0.5
    Bm, Cm = torch.randn(b, T, G, N, generator=gen), torch.randn(b, T, G, N, generator=gen)
    D = torch.randn(H, generator=gen)
    doc = torch.zeros(b, T, dtype=torch.long)
    doc[:, 16:] = 1
    w = torch.randn(b, T, H, P, dtype=torch.float64, generator=gen)
    results = []
    for fn, dtype in (
        (lambda *a: ssd_chunked(*a, chunk_size=16, backend="triton"), torch.float32),
        (ssd_naive, torch.float64),
    ):
        xs = [t.detach().to(dtype).requires_grad_() for t in (x, dt, Bm, Cm)]
        y, _ = fn(xs[0], xs[1], A.to(dtype), xs[2], xs[3], D.to(dtype), doc)
        (y.double() * w).sum().backward()
        results.append([y] + [t.grad for t in xs])
    for got, ref in zip(*results):
        close(got, ref, 2e-5)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", cpu) == "torch"  # auto keeps CPU on PyTorch, even with the interpreter
    assert resolve_backend("triton", cpu) == "triton"  # the interpreter runs CPU tensors (TRITON_INTERPRET=1)
    with pytest.raises(ValueError, match="unknown FM backend"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend("torch", cpu) == "triton"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto", cpu)
    if not torch.cuda.is_available():
        monkeypatch.delenv(ENV_VAR)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_available()
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve_backend("triton", cpu)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("scalar,K,V", [(False, 128, 128), (False, 256, 128), (True, 128, 64)])
def test_gpu_bf16_matches_fp32_torch(scalar, K, V):
    """Real sizes in bf16 on the GPU against the fp32 PyTorch chunked path: outputs and every gradient."""
    gen = torch.Generator().manual_seed(6)
    B, H, T = 2, 4, 2048
    q, k, v, g = inputs(B, H, T, K, V, scalar, gen, g_min=0.5 if not scalar else 0.05)
    q, k = q * K**-0.5, k * K**-0.5
    h0 = torch.randn(B, H, K, V, generator=gen)
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 1000:], doc[0, 1024:], doc[1, 64:] = 1, 2, 3
    w_o = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen).cuda()
    w_f = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen).cuda()
    cuda = [t.cuda() for t in (q, k, v, g, h0)]
    kw = dict(doc_ids=doc.cuda(), output_final_state=True, chunk_size=64)
    o, f, grads = run_with_grads(triton_fn(), [t.bfloat16() for t in cuda[:4]] + [cuda[4]], w_o, w_f, **kw)
    o_ref, f_ref, grads_ref = run_with_grads(chunk_gated_recurrence, cuda, w_o, w_f, **kw)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
    assert relative_error(o, o_ref) < 2e-2
    assert relative_error(f, f_ref) < 2e-2
    for name, got, ref in zip(["q", "k", "v", "g", "h0"], grads, grads_ref):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, ref) < 3e-2, name
