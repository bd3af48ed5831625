"""Pieces shared by the linear-memory mixers of the memory family (GLA, Gated DeltaNet, Mixture-of-Memories) and
by Memory Caching, which wraps any of them (and FM): what a mixer hands its recurrence, and its output stage.

A linear-memory mixer computes, per head, a state S (K x V) written with outer products and read as S^T q. It
exposes two methods that Memory Caching (`fm_pretrain/model/memory_caching.py`) builds on:

- `memory_inputs(x, doc_ids, cache) -> MemoryInputs`: the recurrence's inputs, head-major;
- `memory_output(o, x, context) -> y`: from the reads o (B, H, T, V) to the block's output (B, T, d_model);
  `context` is `MemoryInputs.context` (None but for Mamba-2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fm_kernels.fm.routing import at_least_fp32
from fm_kernels.gated import gated_recurrence, gated_recurrence_step
from fm_kernels.gated_delta import gated_delta, gated_delta_step
from fm_pretrain.model.layers.norm import head_readout
from fm_pretrain.parallel.layers import column_linear, row_linear, split_param


class MemoryInputs(NamedTuple):
    """The recurrence's inputs for this rank's H heads, head-major. B batch, T tokens, K key width, V value width.

    gated rule: S_t = exp(g_t) S_{t-1} + k_t v_t^T; delta rule (beta given): S_t = exp(g_t) (I - beta_t k_t k_t^T)
    S_{t-1} + beta_t k_t v_t^T; read o_t = S_t^T q_t (q already scaled)."""

    q: torch.Tensor
    """(B, H, T, K) queries (FM: the read weights phi)."""
    k: torch.Tensor
    """(B, H, T, K) keys (FM: the write weights theta)."""
    v: torch.Tensor
    """(B, H, T, V) values."""
    g: torch.Tensor
    """Log-decays <= 0: (B, H, T, K) per key (GLA, FM) or (B, H, T) per head (Gated DeltaNet, Mamba-2)."""
    beta: torch.Tensor | None = None
    """(B, H, T) write strengths of the delta rule; None for the gated rule."""
    rows: torch.Tensor | None = None
    """Sparse FM only: (B, H, T, k) the routed rows; q and k are then (B, H, T, k), the weights at those rows."""
    context: tuple | None = None
    """What the mixer's `memory_output` needs besides the reads (Mamba-2: its gate z and input x, for the D skip)."""


def identity_at(inputs: MemoryInputs, pad: torch.Tensor | None) -> MemoryInputs:
    """Inputs with identity steps at pad (B, T) bool (left-padded generation, model/cache.py): no decay (g = 0),
    no write (k = 0, beta = 0), so the state after a run of pads is the state before it."""
    if pad is None:
        return inputs
    head = pad[:, None, :]  # (B, 1, T)
    g = inputs.g.masked_fill(head if inputs.g.dim() == 3 else head[..., None], 0.0)
    beta = None if inputs.beta is None else inputs.beta.masked_fill(head, 0.0)
    return inputs._replace(k=inputs.k.masked_fill(head[..., None], 0.0), g=g, beta=beta)


def run_memory(
    inp: MemoryInputs, doc_ids: torch.Tensor | None, cache: dict | None, chunk_size: int, backend: str,
    key: str = "state", decode: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """The reads o (B, H, T, V) of one memory: the gated rule (inp.beta None) or the gated delta rule. Decoding
    (default: a cache holding `cache[key]` and T = 1) takes one step from that state; otherwise the chunked path on
    `backend` runs from it (or from zero) over the documents of doc_ids, and with a cache the final state is stored
    under `key`."""
    state = None if cache is None else cache.get(key)
    if decode is None:
        decode = state is not None and inp.q.shape[2] == 1
    if decode:
        at = [t[:, :, 0] for t in (inp.q, inp.k, inp.v, inp.g)]
        if inp.beta is None:
            o, cache[key] = gated_recurrence_step(state, *at)
        else:
            o, cache[key] = gated_delta_step(state, *at, inp.beta[:, :, 0])
        return o.unsqueeze(2)
    common = dict(doc_ids=doc_ids, initial_state=state, output_final_state=cache is not None, chunk_size=chunk_size,
                  backend=backend)  # fmt: skip
    if inp.beta is None:
        o, final = gated_recurrence(q=inp.q, k=inp.k, v=inp.v, g=inp.g, **common)
    else:
        o, final = gated_delta(q=inp.q, k=inp.k, v=inp.v, g=inp.g, beta=inp.beta, **common)
    if cache is not None:
        cache[key] = final
    return o


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dim, in fp32 (fp64 stays fp64), back in x's dtype."""
    w = at_least_fp32(x)
    return (w * torch.rsqrt(w.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class HeadOutput(nn.Module):
    """o (B, H, T, V) -> y (B, T, d_model): per-head RMSNorm in fp32 with a learned weight (H, V), an optional SiLU
    output gate silu(W_gate x), then o_proj. The norm weight is per head (not shared by the heads as in
    flash-linear-attention) so that tensor parallelism splits it with its heads."""

    def __init__(self, d_model: int, n_heads: int, d_value: int, output_gate: bool, eps: float, tp: int = 1):
        super().__init__()
        self.eps = eps
        H = n_heads // tp
        self.norm_weight = split_param(nn.Parameter(torch.ones(H, d_value)), tp)
        self.g_proj = column_linear(d_model, n_heads * d_value, tp) if output_gate else None
        self.o_proj = row_linear(n_heads * d_value, d_model, tp)

    def forward(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return head_readout(o, x, self.norm_weight, self.eps, self.g_proj, self.o_proj)
