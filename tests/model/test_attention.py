"""Attention mixer: RoPE positions per document, GQA, SDPA path vs an explicit fp64 reference, KV cache."""

import pytest
import torch

from fm_pretrain.config import AttentionConfig
from fm_pretrain.model.layers.attention import Attention, attention_reference
from fm_pretrain.model.layers.rope import positions_from_doc_ids
from tests.helpers.mixer_checks import check_cached_decoding, check_document_isolation, pack_doc_ids

D_MODEL = 32


def make_attention(n_heads: int = 4, n_kv_heads: int | None = None, dtype=torch.float64) -> Attention:
    cfg = AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=500.0)
    return Attention(D_MODEL, cfg, layer_idx=0, norm_eps=1e-5).to(dtype)


def reference_forward(attn: Attention, x: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Independent restatement: loop positions, complex-number RoPE, loop mask, explicit softmax."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = pos[b, t - 1] + 1 if doc_ids[b, t] == doc_ids[b, t - 1] else 0
    inv_freq = attn.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(B, T, 1, D // 2, dtype=torch.float64), pos[..., None, None] * inv_freq)

    def rope(u: torch.Tensor) -> torch.Tensor:  # pairs (i, i + D/2) as complex numbers
        z = torch.complex(u[..., : D // 2], u[..., D // 2 :]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    q = rope((x @ attn.q_proj.weight.T).view(B, T, H, D)).transpose(1, 2)
    k = rope((x @ attn.k_proj.weight.T).view(B, T, Hkv, D)).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(t + 1):
                mask[b, 0, t, s] = bool(doc_ids[b, s] == doc_ids[b, t])
    o = attention_reference(q, k, v, mask)
    return o.transpose(1, 2).reshape(B, T, H * D) @ attn.o_proj.weight.T


def test_positions_restart_per_document() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [7, 7, 7, 7, 7, 7]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(positions_from_doc_ids(doc_ids), expected)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("lengths", [[13], [4, 6, 3], [1, 11, 1]])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_attention_matches_reference(n_kv_heads, lengths, dtype, atol) -> None:
    torch.manual_seed(0)
    attn = make_attention(n_kv_heads=n_kv_heads, dtype=dtype)
    x = torch.randn(2, sum(lengths), D_MODEL, dtype=dtype)
    doc_ids = pack_doc_ids(lengths, batch=2)
    doc_ids[1] += 100  # ids need not start at 0
    expected = reference_forward(attn.double(), x.double(), doc_ids)
    attn.to(dtype)
    torch.testing.assert_close(attn(x, doc_ids=doc_ids).double(), expected, atol=atol, rtol=0)
    if len(lengths) == 1:  # doc_ids=None takes SDPA's is_causal path
        torch.testing.assert_close(attn(x).double(), expected, atol=atol, rtol=0)


def test_gqa_equals_mha_with_shared_kv_weights() -> None:
    torch.manual_seed(1)
    gqa = make_attention(n_heads=4, n_kv_heads=2)
    mha = make_attention(n_heads=4)
    D = gqa.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # query heads 0,1 read kv head 0; heads 2,3 read kv head 1
            w = getattr(gqa, name).weight.view(2, D, D_MODEL).repeat_interleave(2, dim=0)
            getattr(mha, name).weight.copy_(w.reshape(4 * D, D_MODEL))
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    doc_ids = pack_doc_ids([3, 7], batch=2)
    torch.testing.assert_close(gqa(x, doc_ids=doc_ids), mha(x, doc_ids=doc_ids), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("pieces", [[12], [5, 1, 1, 1, 1, 1, 1, 1], [1] * 12, [3, 4, 1, 4]])
def test_cached_decoding_matches_parallel(n_kv_heads, pieces) -> None:
    torch.manual_seed(2)
    attn = make_attention(n_kv_heads=n_kv_heads)
    check_cached_decoding(attn, torch.randn(2, 12, D_MODEL, dtype=torch.float64), pieces, atol=1e-12)


def test_cache_contents() -> None:
    torch.manual_seed(3)
    attn = make_attention(n_kv_heads=2)
    cache: dict = {}
    attn(torch.randn(1, 5, D_MODEL, dtype=torch.float64), cache=cache)
    attn(torch.randn(1, 1, D_MODEL, dtype=torch.float64), cache=cache)
    assert cache["pos"] == 6 and cache["k"].shape == cache["v"].shape == (1, 2, 6, attn.head_dim)
    with pytest.raises(ValueError):
        attn(torch.randn(1, 1, D_MODEL, dtype=torch.float64), doc_ids=torch.zeros(1, 1), cache=cache)


@pytest.mark.parametrize("lengths", [[5, 9, 4], [1, 7], [6, 1, 1, 3]])
def test_documents_are_isolated(lengths) -> None:
    torch.manual_seed(4)
    attn = make_attention(n_kv_heads=2)
    check_document_isolation(attn, torch.randn(2, sum(lengths), D_MODEL, dtype=torch.float64), lengths, 1e-12)
