"""Gated linear attention (GLA; Yang, Wang, Shen, Panda, Kim 2023) as a token mixer, on the shared gated kernels.

Per head: q_t = W_q x_t / sqrt(K), k_t = W_k x_t, v_t = W_v x_t, a per-key log-decay
g_t = logsigmoid(W_up W_down x_t + b) / gate_norm (a low-rank projection, rank `gate_low_rank`), and

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,    y_t = W_o (RMSNorm(o_t) * silu(W_gate x_t))

the same recurrence as FM's (`fm_kernels.gated`: chunked PyTorch on CPU, Triton on CUDA). The state restarts at
every document start. Optional short causal convolutions (+ SiLU) on q, k, v (`short_conv`).

Generation cache (one dict per layer): "state" (B, H, K, V) fp32, "conv" (B, d_conv - 1, 2 H K + H V) with the
short conv; "pos"/"start" as in model/cache.py (left-padding positions are identity steps).

Tensor parallel (tp > 1): each rank owns n_heads / tp heads; W_q, W_k, W_v, W_up, W_gate, the conv channels, the
gate bias and the norm weight are split by head, W_o by its input; W_down (d_model -> rank) is replicated (its
output feeds the column-parallel W_up, whose backward all-reduces the gradient it receives over the TP group,
so every rank holds W_down's full gradient).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.gated import resolve_backend
from fm_kernels.gated.naive import state_dtype
from fm_pretrain.config import GLAConfig
from fm_pretrain.model.cache import advance, pad_positions
from fm_pretrain.model.layers.linear_memory import HeadOutput, MemoryInputs, identity_at, run_memory
from fm_pretrain.model.layers.short_conv import ShortConv
from fm_pretrain.parallel.layers import column_linear, split_param
from fm_pretrain.parallel.sharding import local_size

log = logging.getLogger(__name__)


class GatedLinearAttention(nn.Module):
    def __init__(self, d_model: int, cfg: GLAConfig, layer_idx: int = 0, norm_eps: float = 1e-5, tp: int = 1):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        H_all, K, V = cfg.n_heads, cfg.d_key, cfg.d_value
        self.n_heads, self.d_key, self.d_value = local_size(H_all, tp, "model.gla.n_heads"), K, V
        self.q_proj = column_linear(d_model, H_all * K, tp)
        self.k_proj = column_linear(d_model, H_all * K, tp)
        self.v_proj = column_linear(d_model, H_all * V, tp)
        if cfg.gate_low_rank:
            self.gk_down = nn.Linear(d_model, cfg.gate_low_rank, bias=False)  # replicated across TP ranks
            self.gk_up = column_linear(cfg.gate_low_rank, H_all * K, tp)
        else:
            self.gk_down, self.gk_up = None, column_linear(d_model, H_all * K, tp)
        # The gate bias lives outside nn.Linear so the LM's generic init does not touch it (starts at 0).
        self.gk_bias = split_param(nn.Parameter(torch.zeros(self.n_heads * K)), tp)
        self.conv = ShortConv((H_all * K, H_all * K, H_all * V), cfg.d_conv, tp) if cfg.short_conv else None
        self.out = HeadOutput(d_model, H_all, V, cfg.output_gate, norm_eps, tp)
        self.backend: str | None = None

    def memory_inputs(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None) -> MemoryInputs:
        """x (B, T, d_model) -> q, k (B, H, T, K), v (B, H, T, V), per-key log-decays g (B, H, T, K) in fp32
        (fp64 for fp64). Updates the conv window in the cache; pad positions become identity steps."""
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.d_key, self.d_value
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        pad = pad_positions(cache, T, x.device)
        if self.conv is not None:
            qkv = torch.cat([q, k, v], dim=-1)
            if pad is not None:
                qkv = qkv.masked_fill(pad[..., None], 0.0)
            q, k, v = self.conv(qkv, doc_ids, cache).split([H * K, H * K, H * V], dim=-1)
        gate_in = x if self.gk_down is None else self.gk_down(x)
        work = state_dtype(x)
        g = F.logsigmoid((self.gk_up(gate_in) + self.gk_bias).to(work)) / self.cfg.gate_norm
        heads = lambda t, d: t.view(B, T, H, d).transpose(1, 2)  # noqa: E731
        inputs = MemoryInputs(q=heads(q, K) * K**-0.5, k=heads(k, K), v=heads(v, V), g=heads(g, K))
        return identity_at(inputs, pad)

    def memory_output(self, o: torch.Tensor, x: torch.Tensor, context=None) -> torch.Tensor:
        """o (B, H, T, V) -> y (B, T, d_model)."""
        return self.out(o, x)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, d_model), doc_ids (B, T) -> y (B, T, d_model). With a cache dict: T > 1 (or no state yet) runs
        the chunked path from the cached state and stores the final state; T = 1 with a state takes one step."""
        if self.backend is None:
            self.backend = resolve_backend(self.cfg.backend, x.device)
            if self.layer_idx == 0:
                log.info("GLA layers use the '%s' backend on %s", self.backend, x.device)
        o = run_memory(self.memory_inputs(x, doc_ids, cache), doc_ids, cache, self.cfg.chunk_size, self.backend)
        advance(cache, x.shape[1])
        return self.memory_output(o.to(x.dtype), x)
