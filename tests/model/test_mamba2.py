"""Mamba-2: SSD chunked (through the shared gated kernels) vs the per-step reference, values and gradients;
the decoding step; the Mamba2 layer's cache, causal conv and document isolation."""

import math

import pytest
import torch
import torch.nn.functional as F

from fm_kernels.ssd import ssd_chunked, ssd_naive, ssd_step
from fm_pretrain.config import Mamba2Config
from fm_pretrain.model.layers.mamba2 import Mamba2
from tests.helpers.mixer_checks import check_cached_decoding, check_document_isolation, pack_doc_ids

D_MODEL = 32


def ssd_inputs(b: int, T: int, H: int, P: int, G: int, N: int, dtype: torch.dtype, docs: bool) -> dict:
    """Fresh random SSD inputs: decays from near 1 to strong, random document boundaries per row."""
    inputs = dict(
        x=torch.randn(b, T, H, P, dtype=dtype),
        dt=F.softplus(torch.randn(b, T, H, dtype=dtype) - 1.0),
        A=-torch.empty(H, dtype=dtype).uniform_(0.1, 8.0),
        B=torch.randn(b, T, G, N, dtype=dtype),
        C=torch.randn(b, T, G, N, dtype=dtype),
        D=torch.randn(H, dtype=dtype),
        initial_state=torch.randn(b, H, N, P, dtype=dtype),
    )
    if docs:  # ~every 8th token starts a new document; rows are packed differently
        inputs["doc_ids"] = (torch.rand(b, T) < 0.12).long().cumsum(dim=1) + 3
    return inputs


SHAPES = [  # (b, T, H, P, G, N, chunk_size)
    (2, 37, 4, 8, 1, 16, 8),  # T not a multiple of the chunk
    (1, 64, 4, 4, 2, 8, 16),  # exact chunks, 2 groups
    (2, 5, 3, 6, 3, 4, 64),  # T shorter than one chunk, one group per head
    (2, 50, 2, 16, 1, 32, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_ssd_chunked_matches_naive(shape, docs, with_state, dtype, atol) -> None:
    torch.manual_seed(0)
    b, T, H, P, G, N, chunk = shape
    inp = ssd_inputs(b, T, H, P, G, N, dtype, docs)
    if not with_state:
        inp["initial_state"] = None
        inp["D"] = None
    ref = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inp.items()}
    y_ref, h_ref = ssd_naive(**ref, output_final_state=True)
    y, h = ssd_chunked(**inp, output_final_state=True, chunk_size=chunk)
    assert y.dtype == dtype and y.shape == (b, T, H, P) and h.shape == (b, H, N, P)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=atol)
    torch.testing.assert_close(h.double(), h_ref, atol=atol, rtol=atol)
    assert ssd_chunked(**inp, chunk_size=chunk)[1] is None


def test_ssd_documents_at_chunk_edges() -> None:
    """Boundaries exactly at chunk starts, one-token documents; the initial state reaches only doc 0."""
    torch.manual_seed(1)
    inp = ssd_inputs(1, 40, 2, 4, 1, 8, torch.float64, docs=False)
    inp["doc_ids"] = pack_doc_ids([8, 8, 1, 7, 1, 1, 14])
    y_ref, h_ref = ssd_naive(**inp, output_final_state=True)
    y, h = ssd_chunked(**inp, output_final_state=True, chunk_size=8)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-10, rtol=0)
    inp["initial_state"] = torch.zeros_like(inp["initial_state"])
    y0 = ssd_chunked(**inp, chunk_size=8)[0]
    assert not torch.allclose(y0[:, :8], y[:, :8])
    torch.testing.assert_close(y0[:, 8:], y[:, 8:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(2, 21, 4, 4, 2, 8, 8), (1, 16, 2, 8, 1, 4, 16)])
@pytest.mark.parametrize("docs", [False, True])
def test_ssd_chunked_gradients_match_naive(shape, docs) -> None:
    torch.manual_seed(2)
    b, T, H, P, G, N, chunk = shape
    inp = ssd_inputs(b, T, H, P, G, N, torch.float64, docs)
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    w_y, w_h = torch.randn(b, T, H, P, dtype=torch.float64), torch.randn(b, H, N, P, dtype=torch.float64)

    def grads(fn, **kw) -> tuple[torch.Tensor, ...]:
        leaves = {k: (v.clone().requires_grad_(True) if k in names else v) for k, v in inp.items()}
        y, h = fn(**leaves, output_final_state=True, **kw)
        return torch.autograd.grad((y * w_y).sum() + (h * w_h).sum(), [leaves[k] for k in names])

    for name, g, g_ref in zip(names, grads(ssd_chunked, chunk_size=chunk), grads(ssd_naive)):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"d/d{n}: {m}")


@pytest.mark.parametrize("G", [1, 2])
def test_ssd_step_continues_chunked(G) -> None:
    """Chunked prefill hands its final state to per-token steps; together they equal the reference."""
    torch.manual_seed(3)
    inp = ssd_inputs(2, 12, 4, 4, G, 8, torch.float64, docs=False)
    y_ref, h_ref = ssd_naive(**inp, output_final_state=True)
    x, dt, A, B, C, D = (inp[k] for k in ("x", "dt", "A", "B", "C", "D"))
    y, h = ssd_chunked(
        x[:, :5], dt[:, :5], A, B[:, :5], C[:, :5], D, initial_state=inp["initial_state"],
        output_final_state=True, chunk_size=4,
    )  # fmt: skip
    ys = [y]
    for t in range(5, 12):
        y_t, h = ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(ys, dim=1), y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------- the layer


def make_mamba2(n_groups: int = 1, d_conv: int = 4, chunk_size: int = 8) -> Mamba2:
    cfg = Mamba2Config(d_state=8, head_dim=16, expand=2, n_groups=n_groups, d_conv=d_conv, chunk_size=chunk_size)
    return Mamba2(D_MODEL, cfg, layer_idx=0, norm_eps=1e-5).double()


def test_ssm_parameter_init() -> None:
    torch.manual_seed(4)
    cfg = Mamba2Config(head_dim=4, dt_min=0.001, dt_max=0.1)
    layer = Mamba2(256, cfg, layer_idx=0, norm_eps=1e-5)  # 128 heads
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.log().std() > 0.5 * (math.log(100) / math.sqrt(12))  # spread over the log range
    A = -torch.exp(layer.A_log)
    assert A.min() >= -16 and A.max() <= -1
    assert torch.equal(layer.D, torch.ones_like(layer.D))


def test_conv_matches_conv1d_without_documents() -> None:
    torch.manual_seed(5)
    layer = make_mamba2()
    xBC = torch.randn(2, 11, layer.conv_dim, dtype=torch.float64)
    expected = layer.conv1d.double()(F.pad(xBC.transpose(1, 2), (layer.d_conv - 1, 0))).transpose(1, 2)
    torch.testing.assert_close(layer._conv(xBC, None, None), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("pieces", [[20], [9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 20, [2, 7, 1, 10]])
def test_cached_decoding_matches_parallel(n_groups, pieces) -> None:
    torch.manual_seed(6)
    layer = make_mamba2(n_groups=n_groups)
    check_cached_decoding(layer, torch.randn(2, 20, D_MODEL, dtype=torch.float64), pieces, atol=1e-10)


@pytest.mark.parametrize("d_conv", [4, 2])
@pytest.mark.parametrize("lengths", [[5, 9, 4], [1, 7], [6, 1, 1, 3], [8, 8, 3]])
def test_documents_are_isolated(d_conv, lengths) -> None:
    torch.manual_seed(7)
    layer = make_mamba2(d_conv=d_conv)
    x = torch.randn(2, sum(lengths), D_MODEL, dtype=torch.float64)
    check_document_isolation(layer, x, lengths, atol=1e-10)


def test_layer_gradients_flow_to_all_parameters() -> None:
    torch.manual_seed(8)
    layer = make_mamba2(n_groups=2)
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64, requires_grad=True)
    layer(x, doc_ids=pack_doc_ids([7, 12], batch=2)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
