"""Causal softmax attention with RoPE and grouped-query heads: the LLaMA baseline mixer.

Packed sequences: a token attends only to earlier tokens of its own document, and RoPE positions restart
at 0 at every document start, so a packed document sees exactly what it would see alone.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.gated.naive import document_index
from fm_pretrain.config import AttentionConfig
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
        if doc_ids is not None:
            positions = positions_from_doc_ids(doc_ids)
        else:
            positions = torch.arange(past, past + T, device=x.device)[None]
        q, k = self._rotate(q, positions), self._rotate(k, positions)

        mask, is_causal = None, False
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache.update(k=k, v=v, pos=past + T)
            if T > 1:  # query i sits at absolute position past + i and sees keys 0..past + i
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
