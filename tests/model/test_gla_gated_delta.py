"""The GLA and Gated DeltaNet mixers: the layer equals its per-step reference (values and every gradient), cached
decoding reproduces the parallel forward, packed documents do not see each other, left padding is an identity,
and the head split that tensor parallelism uses reproduces the full layer."""

import pytest
import torch

from fm_kernels.gated import naive_gated_recurrence
from fm_kernels.gated_delta import naive_gated_delta
from fm_pretrain.config import GatedDeltaConfig, GLAConfig
from fm_pretrain.model.layers.gated_delta import GatedDeltaNet
from fm_pretrain.model.layers.gla import GatedLinearAttention
from tests.helpers.mixer_checks import (
    check_against_reference,
    check_cached_decoding,
    check_document_isolation,
    run_head_split,
)

D = 16
VARIANTS = {
    "gla": dict(),
    "gla_conv_fullrank_nogate": dict(short_conv=True, gate_low_rank=0, output_gate=False),
    "gated_delta": dict(),
    "gated_delta_noconv_nogate": dict(short_conv=False, output_gate=False),
}


def make(name: str, n_heads: int = 2, seed: int = 0) -> torch.nn.Module:
    opts = VARIANTS[name]
    torch.manual_seed(seed)
    if name.startswith("gla"):
        layer = GatedLinearAttention(D, GLAConfig(n_heads=n_heads, d_key=4, d_value=3, chunk_size=4, **opts))
    else:
        layer = GatedDeltaNet(D, GatedDeltaConfig(n_heads=n_heads, d_key=4, d_value=3, chunk_size=4, **opts))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # weights of a useful scale (the LM's init would make the decays all alike)
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 1.0))
        if hasattr(layer, "A_log"):
            layer.A_log.copy_(torch.rand(layer.A_log.shape, generator=gen).log())
    return layer.double()


def reference(layer, x, doc):
    """The layer's own inputs through the per-step reference recurrence, then its output stage."""
    inp = layer.memory_inputs(x, doc, None)
    if inp.beta is None:
        o, _ = naive_gated_recurrence(inp.q, inp.k, inp.v, inp.g, doc)
    else:
        o, _ = naive_gated_delta(inp.q, inp.k, inp.v, inp.g, inp.beta, doc)
    return layer.memory_output(o, x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layer_matches_per_step_reference_with_gradients(name):
    layer = make(name)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, D, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 11, D, dtype=torch.float64, generator=gen)
    doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 2 + [1] * 9])  # T = 11 is not a multiple of the chunk (4)
    check_against_reference(layer, lambda xi: layer(xi, doc), lambda xi: reference(layer, xi, doc), x, w, nonzero=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_and_document_isolation(name):
    layer = make(name).eval()
    x = torch.randn(2, 13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_cached_decoding(layer, x, [6] + [1] * 7, atol=1e-10)
    check_cached_decoding(layer, x, [5, 3, 1, 4], atol=1e-10)  # chunked prefill, a step, more prefill
    check_document_isolation(layer, x, [5, 1, 7], atol=1e-10)


@pytest.mark.parametrize("name", ["gla_conv_fullrank_nogate", "gated_delta"])
def test_left_padding_is_an_identity(name):
    """Row 1 left-padded by 3 positions (cache "start"): its outputs at real positions equal the unpadded run."""
    layer = make(name).eval()
    x = torch.randn(2, 9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cache = {"start": torch.tensor([0, 3])}
    y = torch.cat([layer(x[:, :6], cache=cache), layer(x[:, 6:7], cache=cache), layer(x[:, 7:], cache=cache)], 1)
    alone = layer(x[1:, 3:])
    torch.testing.assert_close(y[1:, 3:], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[:1], layer(x[:1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gla", "gated_delta"])
def test_head_split_reproduces_the_full_layer(name):
    """Tensor parallelism in one process: two layers holding half the heads each (column blocks by head, o_proj by
    input, the replicated low-rank gate copied) sum to the full layer's output, with every gradient."""
    full = make(name, n_heads=4)
    parts = [make(name, n_heads=2, seed=9) for _ in range(2)]
    H, K, V = 4, 4, 3
    for pname, p in full.named_parameters():
        for i, part in enumerate(parts):
            q = part.get_parameter(pname)
            if pname == "gk_down.weight":
                q.data.copy_(p.detach())
            elif pname == "out.o_proj.weight":
                q.data.copy_(p.detach().chunk(2, dim=1)[i])
            elif pname == "conv.weight":  # q | k | v blocks, each split by head
                blocks = p.detach().split([H * K, H * K, H * V])
                q.data.copy_(torch.cat([b.chunk(2)[i] for b in blocks]))
            else:
                q.data.copy_(p.detach().chunk(2, dim=0)[i])
    run_head_split(full, parts, D)
    for pname, p in full.named_parameters():
        grads = [part.get_parameter(pname).grad for part in parts]
        if pname == "gk_down.weight":
            got = grads[0] + grads[1]  # TP: W_up's input all-reduce gives every rank this sum
        elif pname == "out.o_proj.weight":
            got = torch.cat(grads, dim=1)
        elif pname == "conv.weight":
            split = [g.split([2 * K, 2 * K, 2 * V]) for g in grads]
            got = torch.cat([torch.cat([split[0][j], split[1][j]]) for j in range(3)])
        else:
            got = torch.cat(grads, dim=0)
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12, msg=lambda s, n=pname: f"d {n}: {s}")
