"""Memory Caching around a Mixture-of-Memories layer: the wrapped layer equals the per-token reference on MoM's own
inputs (values and every parameter's gradient, fp64), cached decoding (a prefill then single tokens, a prefill in
pieces) reproduces the parallel forward with the cache growing by one MoM state per segment, documents are isolated,
left padding is an identity, with one segment it is plain MoM, and independent states are refused."""

import pytest
import torch

from fm_kernels.caching import SharedInputs, mom_cache_bytes, naive_mom_caching
from fm_pretrain.config import ConfigError, MemoryCachingConfig, MoMConfig
from fm_pretrain.model.layers.mom import MixtureOfMemories
from fm_pretrain.model.memory_caching import MemoryCaching
from tests.helpers.mixer_checks import (
    check_against_reference,
    check_caching_decoding,
    check_left_padding,
    check_one_segment_is_the_base,
)

D = 16
BASES = {
    "gla_shared": dict(inner="gla", shared_memory=True, short_conv=False),
    "delta_conv": dict(inner="gated_delta", shared_memory=True, short_conv=True),
    "gla_noshared_k1": dict(inner="gla", shared_memory=False, short_conv=False, top_k=1),
}
CACHING = {
    "grm": dict(aggregation="grm"),
    "ssc_keys": dict(aggregation="ssc", top_k_segments=1, descriptor="keys"),
    "residual_log": dict(aggregation="residual", segmentation="log"),
}


def make(base: str, caching: str, segment_size: int = 4) -> MemoryCaching:
    torch.manual_seed(0)
    kw = dict(n_memories=3, top_k=2, n_heads=2, d_key=4, d_value=3, chunk_size=2, aux_loss_weight=0.0)
    mom = MixtureOfMemories(D, MoMConfig(**{**kw, **BASES[base]}))
    cfg = MemoryCachingConfig(mixers=["mom"], segment_size=segment_size, d_gate=3, **CACHING[caching])
    layer = MemoryCaching(mom, cfg, D)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 1.0))
        if hasattr(mom, "A_log"):
            mom.A_log.copy_(torch.rand(mom.A_log.shape, generator=gen).log())
    return layer.double()


def reference(layer: MemoryCaching, x: torch.Tensor, doc: torch.Tensor | None) -> torch.Tensor:
    """MoM's dense inputs (every memory at every token; no convs) through the per-token reference, then its
    output stage."""
    mom = layer.base
    B, T, _ = x.shape
    memories, weights = mom.routing(x)
    q = mom._queries(x, doc, None, None)
    qh = q.transpose(1, 2)
    k, v, g, beta = mom.dense_inputs(x)
    shared = None
    if mom.shared is not None:
        inp = mom.shared_inputs(x, q, doc, None, None)
        shared = SharedInputs(inp.k, inp.v, inp.g, inp.beta)
    H = qh.shape[1]
    u = layer.w_u(x).view(B, T, H, -1).transpose(1, 2) if layer.w_u is not None else x.new_zeros(B, H, T, layer.width)
    desc = qh if layer.cfg.descriptor == "keys" else u
    o = naive_mom_caching(qh, k, v, g, memories, weights, u, desc, layer.spec, beta, shared, doc)
    return mom.out(o.to(x.dtype), x)


@pytest.mark.parametrize("base,caching", [("gla_shared", "grm"), ("gla_noshared_k1", "ssc_keys"),
                                          ("gla_shared", "residual_log")])  # fmt: skip
def test_layer_equals_per_token_reference_with_gradients(base, caching):
    layer = make(base, caching)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 13, D, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 13, D, dtype=torch.float64, generator=gen)
    doc = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
    check_against_reference(layer, lambda xi: layer(xi, doc), lambda xi: reference(layer, xi, doc), x, w)


@pytest.mark.parametrize("base,caching", [("gla_shared", "grm"), ("delta_conv", "ssc_keys"),
                                          ("gla_noshared_k1", "residual_log")])  # fmt: skip
def test_cached_decoding_grows_the_cache_and_documents_are_isolated(base, caching):
    layer = make(base, caching).eval()
    cache = check_caching_decoding(layer, D, CACHING[caching].get("segmentation", "constant"))
    assert cache["mc"].cached.shape[2] == 3 and mom_cache_bytes(cache["mc"]) > 0


def test_left_padding_is_an_identity():
    layer = make("delta_conv", "grm").eval()
    x = torch.randn(2, 12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    check_left_padding(layer, x, atol=1e-10)


@pytest.mark.parametrize("base", list(BASES))
def test_one_segment_is_plain_mom(base):
    """A segment longer than the sequence: nothing is cached, residual and GRM read MoM's online memory alone."""
    for caching in ("grm", "residual_log"):
        check_one_segment_is_the_base(make(base, caching, segment_size=32), D)


def test_independent_states_are_refused():
    from fm_pretrain.config import ModelConfig, _validate_memory_family

    m = ModelConfig()
    m.memory_caching = MemoryCachingConfig(mixers=["mom"], state_mode="independent")
    with pytest.raises(ConfigError, match="model.memory_caching.state_mode"):
        _validate_memory_family(m)
