"""Causal softmax attention with RoPE and grouped-query heads: the LLaMA baseline mixer.

Packed sequences: a token attends only to earlier tokens of its own document, and RoPE positions restart
at 0 at every document start, so a packed document sees exactly what it would see alone.

Two paths compute the same function for packed sequences (`doc_ids` given, no cache):
- `flex` (CUDA): FlexAttention (`torch.nn.attention.flex_attention`, compiled to one fused Triton kernel per
  shape) with a block mask built from the document ids. Tiles of the (T x T) score matrix that lie wholly
  above the diagonal or between two documents are skipped, and the kernel forms no (T x T) score or mask
  tensor; the block mask itself is built once per batch (from a transient boolean evaluation of the rule) and
  shared by every layer.
- `sdpa` (CPU, fp64, generation with a cache, or a forced choice): scaled_dot_product_attention with the
  dense boolean (B, 1, T, T) mask of `document_causal_mask`.
`attention_backend` picks one: `auto` is `flex` on CUDA in fp32/bf16/fp16, `sdpa` otherwise; the environment
variable FM_PRETRAIN_ATTENTION=auto|sdpa|flex overrides it. On CPU FlexAttention runs unfused and forward-only
(torch refuses its backward there), which the tests use to compare it with the dense path. Tensor parallelism
is unchanged: each rank attends with its own heads, and the block mask is shared by all heads.
"""

import functools
import math
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.gated.naive import document_index
from fm_pretrain.config import AttentionConfig
from fm_pretrain.model.cache import padded_key_mask, padded_positions
from fm_pretrain.model.layers.rope import apply_rope, positions_from_doc_ids, rope_cos_sin
from fm_pretrain.parallel.layers import column_linear, row_linear
from fm_pretrain.parallel.sharding import local_size


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask, True where query t may attend key s: s <= t and same document.

    A document starts wherever the id changes (as in the recurrent mixers), so an id that comes back later
    is a new document: ids are renumbered before they are compared.
    """
    B, T = doc_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    doc = document_index(doc_ids, B, T, doc_ids.device)
    same_doc = doc[:, :, None] == doc[:, None, :]
    return (causal & same_doc)[:, None]


BACKEND_ENV = "FM_PRETRAIN_ATTENTION"
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flex_module():
    """torch.nn.attention.flex_attention, or None where this torch lacks it (it arrived in torch 2.5)."""
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return None
    return flex_attention


def attention_backend(x: torch.Tensor) -> str:
    """'flex' or 'sdpa' for packed-sequence attention on `x`'s device and dtype (module docstring)."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}: choose one of {list(ATTENTION_BACKENDS)}")
    if choice == "auto":
        choice = "flex" if x.is_cuda and x.dtype in FLEX_DTYPES else "sdpa"
    if choice == "flex" and _flex_module() is None:
        raise RuntimeError(f"{BACKEND_ENV}=flex: this torch ({torch.__version__}) has no FlexAttention")
    return choice


def document_mask_mod(doc: torch.Tensor):
    """FlexAttention mask_mod: query q_idx of row b may attend key kv_idx iff kv_idx <= q_idx and both lie in
    one document. `doc` is the (B, T) running document index of `document_index` (not the raw ids)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return mask_mod


# The last block mask built, with the doc_ids tensor and block size it came from: every attention layer of one
# forward (and activation checkpointing's recomputation) receives the same doc_ids object, so it is built once.
_last_block_mask: tuple[weakref.ref, int, object] | None = None


def document_block_mask(doc_ids: torch.Tensor, block_size: int = 128):
    """FlexAttention BlockMask of `document_causal_mask(doc_ids)`, shared by all heads (H = None).

    Built from `document_mask_mod` on doc_ids' device; reused while the same doc_ids tensor comes back.
    """
    global _last_block_mask
    if _last_block_mask is not None:
        ref, size, mask = _last_block_mask
        if ref() is doc_ids and size == block_size:
            return mask
    B, T = doc_ids.shape
    doc = document_index(doc_ids, B, T, doc_ids.device)
    mask = _flex_module().create_block_mask(
        document_mask_mod(doc), B, None, T, T, device=doc_ids.device, BLOCK_SIZE=block_size
    )
    _last_block_mask = (weakref.ref(doc_ids), block_size, mask)
    return mask


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process (torch.compile specialises it per shape and dtype)."""
    return torch.compile(_flex_module().flex_attention, dynamic=False)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal same-document attention through FlexAttention. q: (B, H, T, D); k, v: (B, H_kv, T, D).

    Compiled on CUDA (the fused kernel); eager elsewhere (the unfused reference, forward only on CPU).
    """
    flex = _flex_module()
    fn = _compiled_flex_attention() if q.is_cuda else flex.flex_attention
    gqa = q.shape[1] != k.shape[1]
    return fn(q, k, v, block_mask=document_block_mask(doc_ids), enable_gqa=gqa)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D); query head h reads kv head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v, the slow reference for tests.

    q: (B, H, T, D); k, v: (B, H_kv, S, D); mask: boolean, broadcastable to (B, H, T, S), True = attend.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head (GQA when n_kv_heads < n_heads) causal self-attention with RoPE.

    forward(x, doc_ids=None, cache=None): x (B, T, d_model). With a cache (generation, doc_ids None) the
    rotated keys/values of all past tokens and the position counter live in the caller's dict.
    """

    def __init__(self, d_model: int, cfg: AttentionConfig, layer_idx: int, norm_eps: float, tp: int = 1):
        super().__init__()
        n_kv = cfg.n_kv_heads or cfg.n_heads
        if d_model % cfg.n_heads or cfg.n_heads % n_kv:
            raise ValueError(f"need n_heads | d_model and n_kv_heads | n_heads: {d_model=}, {cfg=}")
        self.layer_idx = layer_idx
        self.head_dim = d_model // cfg.n_heads
        # Tensor parallel: each rank owns n_heads / tp query heads and their n_kv_heads / tp kv heads.
        self.n_heads = local_size(cfg.n_heads, tp, "model.attention.n_heads")
        self.n_kv_heads = local_size(n_kv, tp, "model.attention.n_kv_heads")
        self.rope_theta = cfg.rope_theta
        self.q_proj = column_linear(d_model, cfg.n_heads * self.head_dim, tp)
        self.k_proj = column_linear(d_model, n_kv * self.head_dim, tp)
        self.v_proj = column_linear(d_model, n_kv * self.head_dim, tp)
        self.o_proj = row_linear(cfg.n_heads * self.head_dim, d_model, tp)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on (B, H, T, D) with positions (B or 1, T); angles in fp32 (fp64 for fp64 inputs)."""
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, dtype=work)
        return apply_rope(x.to(work), cos[:, None], sin[:, None]).to(x.dtype)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        past = 0
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("generation with a cache handles one document per row: pass doc_ids=None")
            past = cache.get("pos", 0)
        start = None if cache is None else cache.get("start")  # left-padded rows (model/cache.py)
        if doc_ids is not None:
            positions = positions_from_doc_ids(doc_ids)
        elif start is not None:
            positions = padded_positions(start, past, T)
        else:
            positions = torch.arange(past, past + T, device=x.device)[None]
        q, k = self._rotate(q, positions), self._rotate(k, positions)

        if cache is None and doc_ids is not None and attention_backend(q) == "flex":
            o = flex_document_attention(q, k, v, doc_ids)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

        mask, is_causal = None, False
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache.update(k=k, v=v, pos=past + T)
            if start is not None:  # pad keys masked out of every real query
                mask = padded_key_mask(start, past, T)
            elif T > 1:  # query i sits at absolute position past + i and sees keys 0..past + i
                key_pos = torch.arange(past + T, device=x.device)
                mask = key_pos[None, :] <= positions[0, :, None]
        elif doc_ids is not None:
            mask = document_causal_mask(doc_ids)
        else:
            is_causal = True  # lets SDPA pick a fused causal kernel

        n_rep = self.n_heads // self.n_kv_heads
        o = F.scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, is_causal=is_causal
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
