"""Training FLOPs per token, aware of each mixer's recurrence (for tokens/s -> MFU).

Counted as 3x the forward (forward + backward), with 2 FLOPs per multiply-add:
- every projection matrix (FM/attention/Mamba-2 projections, MLP, LM head): 2 * in * out per token;
- attention: QK^T and AV over on average seq_len / 2 causal keys: 2 * 2 * d_head * n_heads * seq_len / 2;
- FM: per head, write and read of the rows a token touches: 2 * 2 * rows * d_mem (rows = k sparse, m dense);
- Mamba-2: per head, state update and read: 2 * 2 * d_state * head_dim.
- GLA: per head, write and read of the (d_key x d_value) state: 2 * 2 * d_key * d_value.
- Gated DeltaNet: per head, k^T S, the rank-one update and the read: 2 * 3 * d_key * d_value.
- Mixture-of-Memories: the k routed memories and the shared one, each as its inner rule (GLA or Gated DeltaNet)
  costs per head; only the k routed memories' projections run (O(k), layers/mom.py), so the other M - k of
  the M per-memory projection matrices count nothing.
- Memory Caching (model.memory_caching) on top of a mixer: per head, the reads of the token's cached states,
  2 * K_read * V each (K_read = k rows for sparse FM), and the scores, 2 * d_gate per cached segment: on average
  (L / U - 1) / 2 cached segments with constant segments of U tokens, half of log2(L / U) with log segments; SSC
  reads at most top_k_segments of them.
Sparse FM with per-row rates computes W_eta and W_mu only at the k routed rows of each head (layers/fm.py), so
those two projections count k / m of their size.
The chunked algorithms do more work than these algorithmic counts; MFU reports useful work only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PEAK_TFLOPS = {  # dense tensor-core peaks per device, (bf16, tf32)
    "H100": (989.0, 494.0),
    "H200": (989.0, 494.0),
    "A100": (312.0, 156.0),
}


def caching_flops_forward(cfg, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token that Memory Caching adds to one layer of mixer `kind` (0 if it does not wrap it)."""
    mc = cfg.memory_caching
    if kind not in mc.mixers:
        return 0.0
    if kind == "fm":
        f = cfg.fm
        heads, k_read, v, k_full = f.n_heads, f.top_k or f.n_memories, f.d_mem, f.n_memories
    elif kind == "mamba2":
        mb = cfg.mamba2
        heads, k_read, v, k_full = mb.expand * cfg.d_model // mb.head_dim, mb.d_state, mb.head_dim, mb.d_state
    else:
        sub = getattr(cfg, kind)
        heads, k_read, v, k_full = sub.n_heads, sub.d_key, sub.d_value, sub.d_key
    units = seq_len / mc.segment_size
    cached = max(0.0, (units - 1) / 2) if mc.segmentation == "constant" else math.log2(max(units, 1.0)) / 2
    reads = min(cached, mc.top_k_segments) if mc.aggregation == "ssc" else cached
    width = k_full if mc.descriptor == "keys" else mc.d_gate
    scores = 0.0 if mc.aggregation == "residual" else 2 * width * (cached + 1)
    if kind == "mom":  # a cached MoM state is read at the token's k memories and the shared one
        reads *= cfg.mom.top_k + int(cfg.mom.shared_memory)
    return heads * (reads * 2 * k_read * v + scores)


def recurrence_flops_forward(model: nn.Module, seq_len: int) -> float:
    cfg = model.cfg
    total = 0.0
    for i in range(cfg.n_layers):
        kind = cfg.mixer_of_layer(i)
        total += caching_flops_forward(cfg, kind, seq_len)
        if kind == "attention":
            total += 2 * cfg.d_model * seq_len  # (2 matmuls * 2 FLOPs * seq_len/2) * n_heads * d_head
        elif kind == "fm":
            f = cfg.fm
            rows = f.top_k if f.top_k is not None else f.n_memories
            total += 4 * f.n_heads * rows * f.d_mem
        elif kind == "gla":
            total += 4 * cfg.gla.n_heads * cfg.gla.d_key * cfg.gla.d_value
        elif kind == "gated_delta":
            total += 6 * cfg.gated_delta.n_heads * cfg.gated_delta.d_key * cfg.gated_delta.d_value
        elif kind == "mom":
            mo = cfg.mom
            per_memory = (6 if mo.inner == "gated_delta" else 4) * mo.n_heads * mo.d_key * mo.d_value
            total += (mo.top_k + int(mo.shared_memory)) * per_memory
        elif kind == "mamba2":
            mb = cfg.mamba2
            n_heads = mb.expand * cfg.d_model // mb.head_dim
            total += 4 * n_heads * mb.d_state * mb.head_dim
    return total


def matmul_weight_numel(model: nn.Module) -> int:
    """Elements of every projection matrix (2-D `weight` of any module but the input embedding), counted at
    their full TP = 1 size so MFU is the same whatever the tensor-parallel split."""
    from fm_pretrain.parallel import full_numel

    embed = getattr(model, "embed", None)
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if module is not embed and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            total += full_numel(weight)
    return total


def unused_rate_weight_numel(model: nn.Module) -> int:
    """Elements of W_eta and W_mu that sparse FM layers with per-row rates never multiply: only the k routed
    rows of each head are computed, so (m - k) / m of both matrices does no work (full TP = 1 size)."""
    cfg = model.cfg
    f = cfg.fm
    if f.top_k is None or f.top_k >= f.n_memories or not f.rate_per_row:
        return 0
    n_fm = sum(cfg.mixer_of_layer(i) == "fm" for i in range(cfg.n_layers))
    return n_fm * 2 * cfg.d_model * f.n_heads * (f.n_memories - f.top_k)


def unrouted_memory_weight_numel(model: nn.Module) -> int:
    """Elements of the per-memory projections of MoM layers that a token does not use: each token runs k of the M
    memories' projections, so (M - k) / M of them does no work (full TP = 1 size)."""
    cfg = model.cfg
    mo = cfg.mom
    n_mom = sum(cfg.mixer_of_layer(i) == "mom" for i in range(cfg.n_layers))
    gates = 2 if mo.inner == "gated_delta" else mo.d_key
    per_memory = cfg.d_model * mo.n_heads * (mo.d_key + mo.d_value + gates)
    return n_mom * (mo.n_memories - mo.top_k) * per_memory


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    matmul = matmul_weight_numel(model) - unused_rate_weight_numel(model) - unrouted_memory_weight_numel(model)
    return 3 * (2 * matmul + recurrence_flops_forward(model, seq_len))


def peak_flops_per_device(device_name: str, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else a lookup by GPU name; None when unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in device_name:
            return (bf16 if precision == "bf16" else tf32) * 1e12
    return None
