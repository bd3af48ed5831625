"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024) as a token mixer: the gated delta rule.

Per head, after short causal convolutions (+ SiLU) on q, k, v (`short_conv`, on by default; without it, SiLU
alone), q and k L2-normalised and q scaled by 1/sqrt(K):

    beta_t = sigmoid(W_b x_t),   g_t = -exp(A_log) softplus(W_a x_t + dt_bias)   (log of the decay a_t, per head)
    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t,
    y_t = W_o (RMSNorm(o_t) * silu(W_gate x_t))

Training and prefill use the chunked path on the backend `cfg.backend` (`fm_kernels.gated_delta.gated_delta`:
`torch`, our WY / UT-transform `chunk_gated_delta`; `fla`, flash-linear-attention's Triton kernel on CUDA;
`auto`, fla on CUDA when it imports, else torch); decoding always our per-step update. The state restarts at
every document start.

Initialisation (as the reference): A = exp(A_log) uniform in [1, 16]; softplus(dt_bias) log-uniform in
[dt_min, dt_max]; both separate parameters, not decayed.

Generation cache: "state" (B, H, K, V) fp32, "conv" (B, d_conv - 1, 2 H K + H V); "pos"/"start" as in
model/cache.py (left-padding positions are identity steps: beta = 0, g = 0).

Tensor parallel (tp > 1): each rank owns n_heads / tp heads; W_q, W_k, W_v, W_a, W_b, W_gate, the conv channels,
A_log, dt_bias and the norm weight are split by head, W_o by its input.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.gated.naive import state_dtype
from fm_kernels.gated_delta import resolve_delta_backend
from fm_pretrain.config import GatedDeltaConfig
from fm_pretrain.model.cache import advance, pad_positions
from fm_pretrain.model.layers.linear_memory import HeadOutput, MemoryInputs, identity_at, l2_normalize, run_memory
from fm_pretrain.model.layers.short_conv import ShortConv
from fm_pretrain.parallel.layers import column_linear, split_param
from fm_pretrain.parallel.sharding import local_size

log = logging.getLogger(__name__)


@torch.no_grad()
def init_decay_parameters(A_log: torch.Tensor, dt_bias: torch.Tensor, dt_min: float, dt_max: float) -> None:
    """A = exp(A_log) uniform in [1, 16]; softplus(dt_bias) log-uniform in [dt_min, dt_max] (Mamba-2's init)."""
    A_log.copy_(torch.empty_like(A_log, dtype=torch.float64).uniform_(1.0, 16.0).log())
    u = torch.rand(dt_bias.shape, dtype=torch.float64, device=dt_bias.device)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def delta_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """a, b (..., H) projections -> (g, beta) (..., H) in fp32 (fp64 for fp64): g = -exp(A_log) softplus(a + dt_bias)
    (the log-decay, <= 0), beta = sigmoid(b)."""
    work = state_dtype(a)
    g = -torch.exp(A_log.to(work)) * F.softplus(a.to(work) + dt_bias.to(work))
    return g, torch.sigmoid(b.to(work))


class GatedDeltaNet(nn.Module):
    def __init__(self, d_model: int, cfg: GatedDeltaConfig, layer_idx: int = 0, norm_eps: float = 1e-5, tp: int = 1):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        H_all, K, V = cfg.n_heads, cfg.d_key, cfg.d_value
        self.n_heads, self.d_key, self.d_value = local_size(H_all, tp, "model.gated_delta.n_heads"), K, V
        self.q_proj = column_linear(d_model, H_all * K, tp)
        self.k_proj = column_linear(d_model, H_all * K, tp)
        self.v_proj = column_linear(d_model, H_all * V, tp)
        self.a_proj = column_linear(d_model, H_all, tp)
        self.b_proj = column_linear(d_model, H_all, tp)
        self.A_log = split_param(nn.Parameter(torch.empty(self.n_heads)), tp)
        self.dt_bias = split_param(nn.Parameter(torch.empty(self.n_heads)), tp)
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True
        init_decay_parameters(self.A_log, self.dt_bias, cfg.dt_min, cfg.dt_max)
        self.conv = ShortConv((H_all * K, H_all * K, H_all * V), cfg.d_conv, tp) if cfg.short_conv else None
        self.out = HeadOutput(d_model, H_all, V, cfg.output_gate, norm_eps, tp)
        self.backend: str | None = None  # cfg.backend resolved on the first forward's device

    def memory_inputs(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None) -> MemoryInputs:
        """x (B, T, d_model) -> q, k (B, H, T, K) (L2-normalised, q scaled), v (B, H, T, V), g, beta (B, H, T) in
        fp32 (fp64 for fp64). Updates the conv window in the cache; pad positions become identity steps."""
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.d_key, self.d_value
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        pad = pad_positions(cache, T, x.device)
        if pad is not None:
            qkv = qkv.masked_fill(pad[..., None], 0.0)
        qkv = self.conv(qkv, doc_ids, cache) if self.conv is not None else F.silu(qkv)
        q, k, v = qkv.split([H * K, H * K, H * V], dim=-1)
        g, beta = delta_gates(self.a_proj(x), self.b_proj(x), self.A_log, self.dt_bias)
        heads = lambda t, d: t.view(B, T, H, d).transpose(1, 2)  # noqa: E731
        inputs = MemoryInputs(
            q=l2_normalize(heads(q, K)) * K**-0.5, k=l2_normalize(heads(k, K)), v=heads(v, V),
            g=g.transpose(1, 2), beta=beta.transpose(1, 2),
        )  # fmt: skip
        return identity_at(inputs, pad)

    def memory_output(self, o: torch.Tensor, x: torch.Tensor, context=None) -> torch.Tensor:
        """o (B, H, T, V) -> y (B, T, d_model)."""
        return self.out(o, x)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, d_model), doc_ids (B, T) -> y (B, T, d_model). With a cache dict: T > 1 (or no state yet) runs
        the chunked path from the cached state and stores the final state; T = 1 with a state takes one step."""
        if self.backend is None:
            self.backend = resolve_delta_backend(self.cfg.backend, x.device)
            if self.layer_idx == 0:
                log.info("Gated DeltaNet layers use the '%s' backend on %s", self.backend, x.device)
        o = run_memory(self.memory_inputs(x, doc_ids, cache), doc_ids, cache, self.cfg.chunk_size, self.backend)
        advance(cache, x.shape[1])
        return self.memory_output(o.to(x.dtype), x)
