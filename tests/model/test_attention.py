"""Attention mixer: RoPE positions per document, GQA, SDPA path vs an explicit fp64 reference, KV cache;
the FlexAttention path (block mask from document ids) against the dense-mask path."""

import math

import pytest
import torch

from fm_kernels.gated.naive import document_index
from fm_pretrain.config import AttentionConfig
from fm_pretrain.model.layers.attention import (
    BACKEND_ENV,
    Attention,
    attention_backend,
    attention_reference,
    document_block_mask,
    document_causal_mask,
    document_mask_mod,
)
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


# ---- FlexAttention: the block mask built from document ids, against the dense mask and the SDPA path ----


def random_layout(B: int, T: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) ids in runs of 1..max_len tokens, each run's id drawn from 3 values, so ids recur (7, 7, 3, 7:
    three documents) and neighbouring runs may merge; every row has its own layout."""
    rows = []
    for _ in range(B):
        ids: list[int] = []
        while len(ids) < T:
            n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
            ids += [5 + int(torch.randint(0, 3, (1,), generator=gen))] * n
        rows.append(ids[:T])
    return torch.tensor(rows)


def loop_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T) by the rule itself: t sees s iff s <= t and the id does not change anywhere in [s, t]."""
    B, T = doc_ids.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(t + 1):
                mask[b, t, s] = bool((doc_ids[b, s : t + 1] == doc_ids[b, t]).all())
    return mask


LAYOUTS = [(1, 1), (37, 1), (64, 5), (97, 40), (150, 300), (130, 9)]  # (T, longest run)
# On CPU FlexAttention runs its unfused reference implementation, and says so once.
unfused_ok = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("T,max_len", LAYOUTS)
def test_mask_mod_equals_dense_mask(T, max_len) -> None:
    gen = torch.Generator().manual_seed(T * 1000 + max_len)
    doc_ids = random_layout(3, T, max_len, gen)
    expected = loop_mask(doc_ids)
    assert torch.equal(document_causal_mask(doc_ids)[:, 0], expected)  # today's dense mask
    mask_mod = document_mask_mod(document_index(doc_ids, 3, T, doc_ids.device))
    b, q, kv = torch.arange(3)[:, None, None], torch.arange(T)[None, :, None], torch.arange(T)[None, None, :]
    assert torch.equal(mask_mod(b, 0, q, kv), expected)  # evaluated directly, broadcasting
    from torch.nn.attention.flex_attention import create_mask

    assert torch.equal(create_mask(mask_mod, 3, 1, T, T, device="cpu")[:, 0], expected)  # through flex's vmap


@pytest.mark.parametrize("T,max_len", LAYOUTS)
@pytest.mark.parametrize("block", [8, 16])
def test_block_mask_keeps_exactly_the_tiles_with_visible_pairs(T, max_len, block) -> None:
    """A tile of the (T x T) grid is computed iff it holds a visible pair; a tile marked full (no mask_mod
    evaluated inside) holds only visible pairs."""
    gen = torch.Generator().manual_seed(T + max_len + block)
    doc_ids = random_layout(2, T, max_len, gen)
    nb = math.ceil(T / block)
    visible = torch.zeros(2, nb * block, nb * block, dtype=torch.bool)
    visible[:, :T, :T] = loop_mask(doc_ids)
    real = torch.zeros_like(visible)
    real[:, :T, :T] = True
    tiles = lambda m: m.view(2, nb, block, nb, block).transpose(2, 3)  # (B, q tile, kv tile, block, block)
    any_visible = tiles(visible).flatten(3).any(-1)
    all_visible = tiles(visible | ~real).flatten(3).all(-1)

    mask = document_block_mask(doc_ids, block_size=block)
    assert torch.equal(mask.to_dense()[:, 0].bool(), any_visible)
    full = torch.zeros(2, nb, nb, dtype=torch.bool)
    for bi in range(2):
        for qi in range(nb):
            n = int(mask.full_kv_num_blocks[bi, 0, qi])
            full[bi, qi, mask.full_kv_indices[bi, 0, qi, :n].long()] = True
    assert not (full & ~all_visible).any()


@unfused_ok
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_flex_forward_matches_sdpa_on_cpu(monkeypatch, n_kv_heads, dtype, atol) -> None:
    """The layer through FlexAttention (unfused on CPU, forward only) == the dense-mask SDPA path."""
    torch.manual_seed(5)
    attn = make_attention(n_kv_heads=n_kv_heads, dtype=dtype)
    x = torch.randn(3, 70, D_MODEL, dtype=dtype)
    doc_ids = random_layout(3, 70, 12, torch.Generator().manual_seed(5))
    with torch.no_grad():
        monkeypatch.setenv(BACKEND_ENV, "sdpa")
        dense = attn(x, doc_ids=doc_ids)
        monkeypatch.setenv(BACKEND_ENV, "flex")
        flex = attn(x, doc_ids=doc_ids)
    torch.testing.assert_close(flex, dense, atol=atol, rtol=0)


@unfused_ok
def test_flex_matches_the_explicit_reference() -> None:
    """Independent of SDPA: the flex path against the loop/complex-RoPE reference in fp64."""
    torch.manual_seed(6)
    attn = make_attention(n_kv_heads=2)
    x = torch.randn(2, 14, D_MODEL, dtype=torch.float64)
    doc_ids = pack_doc_ids([4, 1, 9], batch=2)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setenv(BACKEND_ENV, "flex")
        got = attn(x, doc_ids=doc_ids)
    torch.testing.assert_close(got, reference_forward(attn, x, doc_ids), atol=1e-12, rtol=0)


def test_backend_choice(monkeypatch) -> None:
    x = torch.zeros(1, 2, 3, 4)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert attention_backend(x) == "sdpa"  # auto: FlexAttention only on CUDA
    monkeypatch.setenv(BACKEND_ENV, "flex")
    assert attention_backend(x) == "flex"
    monkeypatch.setenv(BACKEND_ENV, "SDPA")
    assert attention_backend(x) == "sdpa"
    monkeypatch.setenv(BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        attention_backend(x)


def test_block_mask_is_built_once_per_doc_ids_tensor() -> None:
    doc_ids = pack_doc_ids([3, 5], batch=2)
    first = document_block_mask(doc_ids)
    assert document_block_mask(doc_ids) is first  # the next layer of the same forward
    assert document_block_mask(doc_ids.clone()) is not first  # the next batch


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,d_model,n_heads,n_kv_heads",
    [(torch.bfloat16, 768, 12, None), (torch.float32, 2048, 16, 4)],  # transformer_125m; GQA at head_dim 128
)
def test_gpu_flex_matches_sdpa(monkeypatch, dtype, d_model, n_heads, n_kv_heads) -> None:
    """Training sizes on CUDA: the compiled FlexAttention path and the dense-mask SDPA path, outputs and the
    gradients of the input and every weight, each against an fp64 SDPA reference on the same weights. (Each
    case compiles FlexAttention's forward and backward once: two cases keep the GPU check's test stage short.)"""
    torch.manual_seed(7)
    B, T = 2, 2048
    cfg = AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=10000.0)
    attn = Attention(d_model, cfg, layer_idx=0, norm_eps=1e-5)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    lengths = [1, 700, 129, 1, 128, 1089]  # a 1-token document, edges on and off the 128-token tiles
    doc_ids = torch.stack([pack_doc_ids(lengths)[0], pack_doc_ids(lengths[::-1])[0]]).cuda()
    x = torch.randn(B, T, d_model, device="cuda")
    w = torch.randn(B, T, d_model, device="cuda", dtype=torch.float64)

    def run(module: Attention, x: torch.Tensor, backend: str) -> list[torch.Tensor]:
        monkeypatch.setenv(BACKEND_ENV, backend)
        module.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = module(x, doc_ids=doc_ids)
        (y.double() * w).sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in module.parameters()]

    ref_module = Attention(d_model, cfg, 0, 1e-5)
    ref_module.load_state_dict(attn.state_dict())
    ref = run(ref_module.cuda().double(), x.double(), "sdpa")
    attn = attn.cuda().to(dtype)
    flex = run(attn, x.to(dtype), "flex")
    sdpa = run(attn, x.to(dtype), "sdpa")
    monkeypatch.delenv(BACKEND_ENV)
    assert attention_backend(x.to(dtype)) == "flex"  # what training on CUDA uses
    names = ["output", "input grad"] + [n for n, _ in attn.named_parameters()]
    for name, f, s, r in zip(names, flex, sdpa, ref):
        assert torch.isfinite(f).all(), name
        err_flex, err_sdpa = relative_error(f, r), relative_error(s, r)
        # bf16: FlexAttention no less accurate than SDPA (both round to bf16); fp32: both close to fp64
        bound = 2 * err_sdpa + 2e-3 if dtype == torch.bfloat16 else 1e-3
        assert err_flex <= bound, f"{name}: flex {err_flex:.2e}, sdpa {err_sdpa:.2e} (vs fp64)"
