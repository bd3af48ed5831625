"""The Mixture-of-Memories mixer: the O(k) layer equals the dense reference over all M memories (values and every
gradient), cached decoding (touching only the routed memories) reproduces the parallel forward, documents are
isolated, left padding is an identity, the balancing loss, and the head split tensor parallelism uses."""

import pytest
import torch

from fm_kernels.gated import naive_gated_recurrence
from fm_kernels.gated_delta import naive_gated_delta
from fm_kernels.mom import naive_mom
from fm_pretrain.config import MoMConfig
from fm_pretrain.model.layers.mom import MixtureOfMemories, balance_loss
from tests.helpers.mixer_checks import (
    check_against_reference,
    check_cached_decoding,
    check_document_isolation,
    run_head_split,
)

D = 16
VARIANTS = {  # (M, k) and options
    "gla": dict(n_memories=4, top_k=2),
    "gla_k1_noshared": dict(n_memories=3, top_k=1, shared_memory=False, output_gate=False),
    "gla_kM": dict(n_memories=3, top_k=3),
    "delta_noconv": dict(n_memories=4, top_k=2, inner="gated_delta", short_conv=False),
    "delta_conv": dict(n_memories=4, top_k=2, inner="gated_delta"),  # short convs (the gated_delta default)
    "gla_conv": dict(n_memories=3, top_k=2, short_conv=True),
}


def make(name: str, n_heads: int = 2, seed: int = 0, **extra) -> MixtureOfMemories:
    torch.manual_seed(seed)
    cfg = MoMConfig(n_heads=n_heads, d_key=4, d_value=3, chunk_size=4, **{**VARIANTS[name], **extra})
    layer = MixtureOfMemories(D, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 1.0))
        if layer.delta:
            layer.A_log.copy_(torch.rand(layer.A_log.shape, generator=gen).log())
    return layer.double()


def dense_reference(layer: MixtureOfMemories, x: torch.Tensor, doc: torch.Tensor | None) -> torch.Tensor:
    """Every memory's inputs at every token, the literal per-token recurrence over all M (naive_mom), the shared
    memory per step, then the layer's output stage (layers without convolutions)."""
    memories, weights, _ = layer.route(x)
    dense_w = torch.zeros(*memories.shape[:-1], layer.n_memories, dtype=weights.dtype).scatter(-1, memories, weights)
    q = layer._queries(x, doc, None, None).transpose(1, 2)
    k, v, g, beta = layer.dense_inputs(x)
    o, _ = naive_mom(q, k, v, g, dense_w, beta, doc)
    if layer.shared is not None:
        ks, vs, gs, bs = layer._split(layer._activate_kv_gates(layer.shared(x)))
        hm = lambda t: t.transpose(1, 2)  # noqa: E731
        if bs is None:
            o = o + naive_gated_recurrence(q, hm(ks), hm(vs), hm(gs), doc)[0]
        else:
            o = o + naive_gated_delta(q, hm(ks), hm(vs), hm(gs), hm(bs), doc)[0]
    return layer.out(o, x)


@pytest.mark.parametrize("name", ["gla", "gla_k1_noshared", "gla_kM", "delta_noconv"])
def test_layer_equals_dense_reference_with_gradients(name):
    layer = make(name)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, D, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 11, D, dtype=torch.float64, generator=gen)
    doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 2 + [1] * 2 + [2] * 7])
    got = check_against_reference(layer, lambda xi: layer(xi, doc), lambda xi: dense_reference(layer, xi, doc), x, w)
    # the router learns from the lm loss through the weights when 1 < k < M (k = 1: the kept weight is exactly 1)
    if 1 < layer.top_k < layer.n_memories:
        assert got["d router.weight"].abs().max() > 0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_and_document_isolation(name):
    layer = make(name).eval()
    x = torch.randn(2, 13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_cached_decoding(layer, x, [6] + [1] * 7, atol=1e-10)
    check_cached_decoding(layer, x, [3, 1, 5, 1, 3], atol=1e-10)  # prefill continued after a decoding step
    check_document_isolation(layer, x, [5, 1, 7], atol=1e-10)


@pytest.mark.parametrize("name", ["gla", "delta_conv"])
def test_decoding_step_touches_only_the_routed_memories(name):
    layer = make(name).eval()
    x = torch.randn(3, 8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    cache: dict = {}
    layer(x[:, :7], cache=cache)
    before = {key: cache[key].clone() for key in ("states", "kv_conv") if key in cache}
    layer(x[:, 7:], cache=cache)
    memories = layer.route(x[:, 7:])[0][:, 0]  # (B, k)
    untouched = torch.ones(3, layer.n_memories, dtype=torch.bool).scatter(1, memories, False)
    assert untouched.any()
    for key, old in before.items():
        assert torch.equal(cache[key][untouched], old[untouched]), key
        assert not torch.equal(cache[key][~untouched], old[~untouched]), key


@pytest.mark.parametrize("name", ["gla", "delta_conv"])
def test_left_padding_is_an_identity(name):
    layer = make(name).eval()
    x = torch.randn(2, 9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cache = {"start": torch.tensor([0, 3])}
    y = torch.cat([layer(x[:, :6], cache=cache), layer(x[:, 6:7], cache=cache), layer(x[:, 7:], cache=cache)], 1)
    torch.testing.assert_close(y[1:, 3:], layer(x[1:, 3:]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[:1], layer(x[:1]), rtol=1e-10, atol=1e-10)


def test_balancing_loss_and_when_it_is_computed():
    M = 4
    uniform = torch.full((8, M), 1 / M)
    assert torch.isclose(balance_loss(uniform, torch.arange(8).remainder(M)[:, None]), torch.tensor(1.0))
    collapsed = torch.zeros(8, M)
    collapsed[:, 0] = 1
    assert torch.isclose(balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)), torch.tensor(float(M)))
    layer = make("gla", aux_loss_weight=0.5)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    layer(x)
    assert layer.aux_loss is not None and layer.aux_loss > 0
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().max() > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


@pytest.mark.parametrize("name", ["gla", "delta_conv"])
def test_head_split_reproduces_the_full_layer(name):
    """Two layers with half the heads each (router copied, projections split by head within each block) sum to the
    full layer; the router's gradient is the sum of theirs (what the all-reduce of w's gradient gives at TP = 2)."""
    full = make(name, n_heads=4, aux_loss_weight=0.0)
    parts = [make(name, n_heads=2, seed=9, aux_loss_weight=0.0) for _ in range(2)]
    H, K, V = 4, 4, 3
    blocks = [H * K, H * V, H, H] if full.delta else [H * K, H * V, H * K]

    def piece(name_, t, i):
        if name_ == "router.weight":
            return t
        if name_ == "out.o_proj.weight":
            return t.chunk(2, dim=1)[i]
        if name_.startswith(("memories.", "shared.")):
            return torch.cat([b.chunk(2)[i] for b in t.split(blocks)])
        if name_ in ("kv_conv.weight", "shared_conv.weight"):
            return torch.cat([b.chunk(2)[i] for b in t.split([H * K, H * V])])
        return t.chunk(2, dim=0)[i]

    for pname, p in full.named_parameters():
        for i, part in enumerate(parts):
            part.get_parameter(pname).data.copy_(piece(pname, p.detach(), i))
    run_head_split(full, parts, D)
    for pname, p in full.named_parameters():
        grads = [part.get_parameter(pname).grad for part in parts]
        if pname == "router.weight":
            torch.testing.assert_close(grads[0] + grads[1], p.grad, rtol=1e-10, atol=1e-12)
            continue
        for i in range(2):
            torch.testing.assert_close(grads[i], piece(pname, p.grad, i), rtol=1e-10, atol=1e-12,
                                       msg=lambda s, n=pname: f"d {n}: {s}")  # fmt: skip


def test_router_statistics_hook():
    """An accumulator set as `router_stats` (one head of M memories) receives the training routing, as FM's does."""
    from fm_pretrain.model.router_stats import RouterStatsAccumulator

    layer = make("gla")
    acc = RouterStatsAccumulator([0], 1, layer.n_memories, torch.device("cpu"))
    layer.router_stats = acc
    layer(torch.randn(2, 12, D, dtype=torch.float64))
    stats = acc.compute()
    assert 0 < stats["router/layer0/entropy"] <= torch.log(torch.tensor(2.0)) + 1e-6  # top-2: at most log 2
    assert 0 <= stats["router/layer0/dead_rows"] < layer.n_memories
