"""The FM mixer as an nn.Module: options, decoding with a cache, document isolation, balancing loss."""

import pytest
import torch

from fm_kernels.fm import naive_fm
from fm_pretrain.config import FMConfig
from fm_pretrain.model.layers.fm import FactorizationMemory, load_balancing_loss, route

OPTIONS = [
    dict(top_k=None),
    dict(top_k=1),
    dict(top_k=3, rate_per_row=False),
    dict(top_k=8, output_gate=True),  # k = m
    dict(top_k=2, tau=0.5, output_gate=True, rate_bias_init=-1.0),
]


def make_layer(**opts) -> FactorizationMemory:
    cfg = FMConfig(n_heads=2, n_memories=8, d_mem=4, chunk_size=4, **opts)
    torch.manual_seed(0)
    return FactorizationMemory(16, cfg, layer_idx=0).double()


@pytest.mark.parametrize("opts", OPTIONS)
def test_layer_matches_reference_recurrence(opts):
    """The layer's read-out equals naive_fm applied to the layer's own gates (spec steps 1-7)."""
    layer = make_layer(**opts)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    theta, phi, xbar, *_ = layer._gates(x)
    r_ref, _ = naive_fm(theta, phi, xbar, doc)
    torch.testing.assert_close(layer(x, doc), layer._output(r_ref, x), rtol=1e-10, atol=1e-10)
    # Sparse routing writes and reads at most k rows per token.
    k = opts["top_k"] or 8
    assert int((theta != 0).sum(-1).max()) <= k and int((phi != 0).sum(-1).max()) <= k


@pytest.mark.parametrize("opts", OPTIONS)
def test_cached_decoding_reproduces_parallel(opts):
    layer = make_layer(**opts).eval()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    full = layer(x)
    cache: dict = {}
    parts = [layer(x[:, :6], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_documents_are_isolated():
    layer = make_layer(top_k=3)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    y = layer(x, doc)
    x2 = x.clone()
    x2[:, :7] = torch.randn(1, 7, 16, dtype=torch.float64)  # change document A only
    y2 = layer(x2, doc)
    torch.testing.assert_close(y2[:, 7:], y[:, 7:], rtol=0, atol=0)
    torch.testing.assert_close(layer(x[:, 7:]), y[:, 7:], rtol=1e-12, atol=1e-12)  # B as if alone
    assert not torch.allclose(y2[:, :7], y[:, :7])


def test_route_topk_renormalises():
    logits = torch.randn(3, 5, 10)
    a, alpha, rows = route(logits, 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 5))
    assert rows.shape == (3, 5, 4) and int((a > 0).sum(-1).max()) == 4
    torch.testing.assert_close(alpha, torch.softmax(logits, -1))


def test_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    m, H = 8, 2
    uniform = torch.full((64, H, m), 1.0 / m)
    rows = torch.arange(64).remainder(m).view(64, 1, 1).expand(64, H, 1)
    assert torch.isclose(load_balancing_loss(uniform, rows, 1), torch.tensor(1.0))
    collapsed = torch.zeros(64, H, m)
    collapsed[..., 0] = 1.0
    assert load_balancing_loss(collapsed, torch.zeros(64, H, 1, dtype=torch.long), 1) > 7.9


def test_aux_loss_only_when_enabled_and_training():
    layer = make_layer(top_k=2, aux_loss_weight=0.01)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    layer(x)
    assert layer.aux_loss is not None and layer.aux_loss > 0
    layer.aux_loss.backward()
    assert layer.w_alpha.weight.grad is not None and layer.w_alpha.weight.grad.abs().sum() > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None
