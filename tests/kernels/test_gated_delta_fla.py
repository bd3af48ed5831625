"""flash-linear-attention's gated delta kernel behind our contract (`fm_kernels.gated_delta.fla`), and the backend
choice (`resolve_delta_backend`, `model.gated_delta.backend`).

fla's kernels do not run in Triton's CPU interpreter (fla 0.6.0 with triton 3.7: the autotuner needs a GPU
driver, and a kernel calls `.to` on a loop index the interpreter keeps as a Python int), so:
- on CPU, the adapter's mapping (layouts, documents -> `cu_seqlens`, initial / final states per row, dtypes) runs
  against a stand-in for `chunk_gated_delta_rule` written here from fla's documented contract on top of our
  per-step reference, values and gradients;
- the `gpu` tests run fla itself against `naive_gated_delta` (skipped, saying so, where fla is not installed).
"""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from fm_kernels.gated.dispatch import ENV_VAR
from fm_kernels.gated_delta import (
    chunk_gated_delta,
    fla_chunk_gated_delta,
    gated_delta,
    naive_gated_delta,
    resolve_delta_backend,
)
from fm_kernels.gated_delta import fla as fla_adapter
from fm_kernels.gated_delta.fla import documents_to_sequences
from tests.helpers.mixer_checks import random_docs

NAMES = ["q", "k", "v", "g", "beta", "initial_state"]
needs_fla = pytest.mark.skipif(
    importlib.util.find_spec("fla") is None,
    reason="flash-linear-attention is not installed (pip install fla-core==0.6.0); the 'fla' backend is optional",
)


def delta_inputs(B, H, T, K, V, dtype, gen):
    """As the layer makes them: L2-normalised keys, beta in (0, 1), log-decays in (-2, 0)."""
    q = torch.randn(B, H, T, K, dtype=dtype, generator=gen) * K**-0.5
    k = F.normalize(torch.randn(B, H, T, K, dtype=dtype, generator=gen), dim=-1)
    v = torch.randn(B, H, T, V, dtype=dtype, generator=gen)
    g = -2 * torch.rand(B, H, T, dtype=dtype, generator=gen)
    beta = torch.rand(B, H, T, dtype=dtype, generator=gen)
    return q, k, v, g, beta


def fake_chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    cu_seqlens=None, cu_seqlens_cpu=None, chunk_size=64,
):  # fmt: skip
    """fla's documented contract (time-first [B, T, H, .], states [N, H, K, V], `cu_seqlens` needs batch 1) on our
    per-step reference, checking what the adapter passes."""
    assert q.shape[0] == 1 or cu_seqlens is None, "fla's varlen mode needs batch 1"
    assert scale == 1.0 and not use_qk_l2norm_in_kernel and chunk_size in (16, 32, 64)
    assert g.dtype == torch.float32 and beta.dtype == q.dtype == k.dtype == v.dtype
    assert all(x.is_contiguous() for x in (q, k, v, g, beta))
    head_first = lambda x: x.transpose(1, 2)  # noqa: E731
    if cu_seqlens is None:
        o, f = naive_gated_delta(*map(head_first, (q, k, v, g, beta)), None, initial_state, output_final_state)
        return head_first(o), f
    assert cu_seqlens.dtype == torch.long and torch.equal(cu_seqlens.cpu(), cu_seqlens_cpu)
    assert initial_state is None or initial_state.shape[0] == cu_seqlens.numel() - 1
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu_seqlens_cpu[:-1].tolist(), cu_seqlens_cpu[1:].tolist())):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, f = naive_gated_delta(*(head_first(x[:, a:b]) for x in (q, k, v, g, beta)), None, h0, True)
        outs.append(head_first(o))
        finals.append(f)
    return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)


@pytest.fixture
def fake_fla(monkeypatch):
    """The stand-in in place of fla's op; returns the list of its calls (one entry per call)."""
    calls: list[int] = []

    def op(*args, **kwargs):
        calls.append(1)
        return fake_chunk_gated_delta_rule(*args, **kwargs)

    monkeypatch.setattr(fla_adapter, "_fla_op", lambda device: op)
    return calls


def run_with_grads(fn, inputs, doc, w_o, w_f, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, f = fn(*leaves[:5], doc, leaves[5], output_final_state=True, **kw)
    ((o.double() * w_o).sum() + (f.double() * w_f).sum()).backward()
    return o, f, [x.grad for x in leaves]


def test_documents_to_sequences():
    doc = torch.tensor([[0, 0, 1, 1, 1], [4, 4, 4, 4, 4], [2, 3, 3, 7, 7]])
    cu, first, last = documents_to_sequences(doc)
    assert cu.tolist() == [0, 2, 5, 10, 11, 13, 15]  # every row start and document start, rows end to end
    assert first.tolist() == [0, 2, 3] and last.tolist() == [1, 2, 5]


@pytest.mark.parametrize("T,n_bounds", [(13, 0), (21, 3), (1, 0)])
@pytest.mark.parametrize("with_docs", [False, True])
def test_adapter_mapping_matches_naive(fake_fla, T, n_bounds, with_docs):
    """Values, final states and every gradient (the initial state's through the per-row scatter) on CPU."""
    gen = torch.Generator().manual_seed(T * 7 + n_bounds)
    B, H, K, V = 3, 2, 4, 3
    inputs = [*delta_inputs(B, H, T, K, V, torch.float32, gen), torch.randn(B, H, K, V, generator=gen)]
    doc = random_docs(B, T, n_bounds, gen) if with_docs else None
    if with_docs and T > 2:
        doc[1, T - 1] += 1  # a one-token document at the end of a row: its state is the row's final state
    w_o = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen)
    w_f = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    o, f, grads = run_with_grads(fla_chunk_gated_delta, inputs, doc, w_o, w_f, chunk_size=8)
    o_ref, f_ref, grads_ref = run_with_grads(naive_gated_delta, [x.double() for x in inputs], doc, w_o, w_f)
    assert o.shape == (B, H, T, V) and o.dtype == torch.float32 and f.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda s, n=name: f"d {n}: {s}")
    assert fla_chunk_gated_delta(*inputs[:5], doc)[1] is None


def test_layer_takes_the_configured_backend(fake_fla):
    """GatedDeltaNet (and MoM's gated-delta shared memory) route their chunked path through the backend; decoding
    stays on our step."""
    from fm_pretrain.config import GatedDeltaConfig, MoMConfig
    from fm_pretrain.model.layers.gated_delta import GatedDeltaNet
    from fm_pretrain.model.layers.mom import MixtureOfMemories

    torch.manual_seed(0)
    x = torch.randn(2, 11, 32)
    doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    cfg = GatedDeltaConfig(n_heads=2, d_key=8, d_value=8, chunk_size=4)
    mom_cfg = MoMConfig(n_memories=3, top_k=2, inner="gated_delta", n_heads=2, d_key=8, d_value=8, chunk_size=4)
    for layer in (GatedDeltaNet(32, cfg), MixtureOfMemories(32, mom_cfg)):
        outs = []
        for backend in ("torch", "fla"):
            layer.backend = backend
            cache: dict = {}
            before = len(fake_fla)
            y = layer(x[:, :10], doc[:, :10], cache)
            outs.append(torch.cat([y, layer(x[:, 10:], None, cache)], dim=1))
            assert len(fake_fla) - before == (backend == "fla")  # the prefill went through fla, the decode step not
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert GatedDeltaNet(32, cfg)(x).shape == x.shape  # auto on CPU resolves to torch
    with pytest.raises(ValueError, match="model.gated_delta.backend"):
        from fm_pretrain.config import from_dict

        from_dict({"model": {"gated_delta": {"backend": "triton"}}})


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_delta_backend("auto", cpu) == "torch"
    assert resolve_delta_backend("torch", cuda) == "torch"
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_delta_backend("fla", cpu)
    with pytest.raises(ValueError, match="unknown gated delta backend"):
        resolve_delta_backend("triton", cpu)
    monkeypatch.setattr(fla_adapter, "_available", True)
    assert resolve_delta_backend("auto", cuda) == "fla"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_delta_backend("fla", cuda) == "torch"
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_delta_backend("torch", cuda) == "fla"
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_delta_backend("auto", cpu)
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(fla_adapter, "_available", False)  # fla absent: auto keeps CUDA on ours, fla says how
    assert resolve_delta_backend("auto", cuda) == "torch"
    with pytest.raises(RuntimeError, match="fla-core"):
        resolve_delta_backend("fla", cuda)


def test_refusals(monkeypatch):
    q, k, v, g, beta = delta_inputs(1, 1, 4, 2, 2, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="CUDA"):
        fla_chunk_gated_delta(q, k, v, g, beta)
    with pytest.raises(ValueError, match="float64"):
        fla_chunk_gated_delta(q.double(), k.double(), v.double(), g, beta)
    monkeypatch.setitem(sys.modules, "fla", None)  # as if not installed: the import error says what to install
    with pytest.raises(ImportError, match="fla-core"):
        fla_adapter._fla_op(torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown gated delta backend"):
        gated_delta(q, k, v, g, beta, backend="triton")


# ---- fla itself (CUDA) -----------------------------------------------------------------------------------------


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("T,n_bounds", [(45, 0), (130, 9)])
def test_gpu_fla_matches_naive(T, n_bounds):
    """fla in fp32 against the per-step reference in fp64: T not a multiple of the chunk, documents inside rows,
    initial state in, final state out, outputs and every gradient. One (H, K, V, chunk) for every gpu test here:
    fla autotunes each kernel per shape key on first use, and the GPU check's test stage is short."""
    gen = torch.Generator().manual_seed(T + n_bounds)
    B, H, K, V = 2, 4, 64, 128
    inputs = [*delta_inputs(B, H, T, K, V, torch.float32, gen), torch.randn(B, H, K, V, generator=gen)]
    doc = random_docs(B, T, n_bounds, gen).cuda() if n_bounds else None
    w_o = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen).cuda()
    w_f = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen).cuda()
    cuda = [x.cuda() for x in inputs]
    o, f, grads = run_with_grads(fla_chunk_gated_delta, cuda, doc, w_o, w_f, chunk_size=64)
    o_ref, f_ref, grads_ref = run_with_grads(naive_gated_delta, [x.double() for x in cuda], doc, w_o, w_f)
    assert o.dtype == torch.float32 and f.dtype == torch.float32
    assert relative_error(o, o_ref) < 1e-2  # fla's fp32 dots may run in TF32; a misplaced reset is ~1e-1
    assert relative_error(f, f_ref) < 1e-2
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, ref) < 2e-2, name


@pytest.mark.gpu
@needs_fla
def test_gpu_fla_bf16_matches_fp32_torch():
    """Longer rows in bf16 against our fp32 chunked path, with documents and an initial state."""
    gen = torch.Generator().manual_seed(3)
    B, H, T, K, V = 2, 4, 2048, 64, 128
    inputs = [*delta_inputs(B, H, T, K, V, torch.float32, gen), torch.randn(B, H, K, V, generator=gen)]
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 1000:], doc[0, 1024:], doc[1, 64:] = 1, 2, 3
    w_o = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen).cuda()
    w_f = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen).cuda()
    cuda = [x.cuda() for x in inputs]
    bf16 = [x.bfloat16() for x in cuda[:3]] + cuda[3:]
    o, f, grads = run_with_grads(fla_chunk_gated_delta, bf16, doc.cuda(), w_o, w_f)
    o_ref, f_ref, grads_ref = run_with_grads(chunk_gated_delta, cuda, doc.cuda(), w_o, w_f)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
    assert relative_error(o, o_ref) < 2e-2
    assert relative_error(f, f_ref) < 2e-2
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, ref) < 3e-2, name
