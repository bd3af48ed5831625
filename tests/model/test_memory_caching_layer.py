"""Memory Caching around FM (dense and sparse), GLA, Gated DeltaNet and Mamba-2 layers: the wrapped layer equals the
per-token reference on the base mixer's own inputs (values and gradients), cached decoding reproduces the parallel
forward with the cache growing, documents are isolated, left padding is an identity, and with one segment it is the
base mixer."""

import pytest
import torch

from fm_kernels.caching import cache_bytes, naive_memory_caching
from fm_pretrain.config import FMConfig, GatedDeltaConfig, GLAConfig, Mamba2Config, MemoryCachingConfig
from fm_pretrain.model.layers.fm import FactorizationMemory
from fm_pretrain.model.layers.gated_delta import GatedDeltaNet
from fm_pretrain.model.layers.gla import GatedLinearAttention
from fm_pretrain.model.layers.mamba2 import Mamba2
from fm_pretrain.model.memory_caching import MemoryCaching
from tests.helpers.mixer_checks import (
    check_against_reference,
    check_caching_decoding,
    check_left_padding,
    check_one_segment_is_the_base,
)

D = 16
BASES = {
    "fm_dense": lambda: FactorizationMemory(D, FMConfig(n_heads=2, n_memories=6, d_mem=4, chunk_size=2)),
    "fm_sparse": lambda: FactorizationMemory(
        D, FMConfig(n_heads=2, n_memories=6, d_mem=4, top_k=2, chunk_size=2, aux_loss_weight=0.1)
    ),  # fmt: skip
    "gla": lambda: GatedLinearAttention(D, GLAConfig(n_heads=2, d_key=4, d_value=3, chunk_size=2, short_conv=True)),
    "gated_delta": lambda: GatedDeltaNet(D, GatedDeltaConfig(n_heads=2, d_key=4, d_value=3, chunk_size=2)),
    "mamba2": lambda: Mamba2(D, Mamba2Config(d_state=4, head_dim=8, n_groups=2, expand=1, chunk_size=2), 0, 1e-5),
}
CACHING = {
    "grm": dict(aggregation="grm"),
    "ssc_keys": dict(aggregation="ssc", top_k_segments=1, descriptor="keys"),
    "residual_independent": dict(aggregation="residual", state_mode="independent"),
    "soup_log": dict(aggregation="soup", segmentation="log"),
}
COMBOS = [("fm_dense", "grm"), ("fm_sparse", "ssc_keys"), ("fm_sparse", "grm"), ("gla", "residual_independent"),
          ("gla", "soup_log"), ("gated_delta", "grm"), ("gated_delta", "ssc_keys"), ("mamba2", "grm"),
          ("mamba2", "ssc_keys"), ("mamba2", "soup_log")]  # fmt: skip


def make(base: str, caching: str, segment_size: int = 4) -> MemoryCaching:
    torch.manual_seed(0)
    cfg = MemoryCachingConfig(mixers=[base.split("_")[0]], segment_size=segment_size, d_gate=3, **CACHING[caching])
    layer = MemoryCaching(BASES[base](), cfg, D)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 1.0))
        if hasattr(layer.base, "A_log"):
            layer.base.A_log.copy_(torch.rand(layer.base.A_log.shape, generator=gen).log())
    return layer.double()


def reference(layer: MemoryCaching, x: torch.Tensor, doc: torch.Tensor | None) -> torch.Tensor:
    """The base mixer's inputs through the per-token reference, then its output stage."""
    inp, _ = layer._inputs(x, doc, None)
    B, T, _ = x.shape
    H = inp.q.shape[1]
    u = layer.w_u(x).view(B, T, H, -1).transpose(1, 2) if layer.w_u is not None else x.new_zeros(B, H, T, layer.width)
    desc = inp.k if layer.cfg.descriptor == "keys" else u
    o = naive_memory_caching(inp.q, inp.k, inp.v, inp.g, u, desc, layer.spec, inp.beta, doc)
    return layer._output(o, x, inp.context)


@pytest.mark.parametrize("base,caching", COMBOS)
def test_layer_equals_per_token_reference_with_gradients(base, caching):
    layer = make(base, caching)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 15, D, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 15, D, dtype=torch.float64, generator=gen)
    doc = torch.tensor([[0] * 6 + [1] * 9, [0] * 15])
    got = check_against_reference(layer, lambda xi: layer(xi, doc), lambda xi: reference(layer, xi, doc), x, w)
    assert got["y"].abs().max() > 0 and got["d x"].abs().max() > 0


@pytest.mark.parametrize("base,caching", COMBOS)
def test_cached_decoding_grows_the_cache_and_documents_are_isolated(base, caching):
    layer = make(base, caching).eval()
    cache = check_caching_decoding(layer, D, CACHING[caching].get("segmentation", "constant"))
    assert cache_bytes(cache["mc"]) > 0


@pytest.mark.parametrize("base,caching", [("fm_sparse", "grm"), ("gated_delta", "ssc_keys"), ("mamba2", "grm")])
def test_left_padding_is_an_identity(base, caching):
    layer = make(base, caching).eval()
    x = torch.randn(2, 12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    check_left_padding(layer, x, atol=1e-10)


@pytest.mark.parametrize("base", list(BASES))
def test_one_segment_is_the_base_mixer(base):
    """A segment longer than the sequence: nothing is cached, residual and GRM read the online memory alone."""
    for caching in ("grm", "residual_independent"):
        check_one_segment_is_the_base(make(base, caching, segment_size=32), D)


def test_router_statistics_reach_the_wrapped_fm_layer():
    """training/components.RouterMonitor attaches its accumulator to every FM layer's mixer and reads n_heads and
    n_memories from it: the wrapper forwards both, and its forward adds the routing as FM's own does."""
    from fm_pretrain.model.router_stats import RouterStatsAccumulator

    layer = make("fm_sparse", "grm")
    acc = RouterStatsAccumulator([0], layer.n_heads, layer.n_memories, torch.device("cpu"))
    layer.router_stats = acc
    assert layer.base.router_stats is acc
    layer(torch.randn(2, 9, D, dtype=torch.float64))
    stats = acc.compute()
    assert stats and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
