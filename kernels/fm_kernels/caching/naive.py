"""Memory Caching (Behrouz et al. 2026) written per token, literally: the ground truth of the chunked path.

For each document of each row, token by token (n = position in the document, U = segment_size):

    independent mode: the online state restarts at 0 at every segment start (n % U == 0)
    S <- update(S; k_t, v_t, g_t[, beta_t]);   o_t = S^T q_t          (the online memory, as the base mixer)
    J = cached segment boundaries of the token (segments.py), each with its state S^(j) and descriptor
        c^(j) = mean of desc over the segment;  online descriptor = mean of desc over the token's own unit so far
    scores z_j = <u_t, c^(j)>, z_online = <u_t, c_online>   (per head)
    residual:  y_t = o_t + sum_j (S^(j))^T q_t
    grm:       gamma = softmax(z_online, z_j);  y_t = gamma_online o_t + sum_j gamma_j (S^(j))^T q_t
    soup:      the states themselves interpolated, then one read: y_t = (gamma_online S + sum_j gamma_j S^(j))^T q_t
               (equal to grm for a linear memory, whose read is linear in the state)
    ssc:       the top_k_segments cached segments by score, the online one always kept, softmax over those
    after the token, if (n + 1) % U == 0: cache S^((n + 1) / U) = S

A new document starts with an empty cache and a zero state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..gated.naive import gated_recurrence_step, state_dtype
from ..gated_delta.naive import gated_delta_step
from .segments import boundaries, segment_start, width_for

AGGREGATIONS = ("residual", "grm", "soup", "ssc")
STATE_MODES = ("checkpoint", "independent")


class CachingSpec(NamedTuple):
    """How cached states are made and read (model.memory_caching, see fm_pretrain/config.py)."""

    aggregation: str = "grm"
    segmentation: str = "constant"
    segment_size: int = 256
    state_mode: str = "checkpoint"
    top_k_segments: int = 2


def mix_weights(z0: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, spec: CachingSpec, cached_bias: float = 0.0):
    """Aggregation weights. z0 (..., ) online scores, z (..., J) cached scores, valid (..., J) bool; cached_bias is
    added to every cached score (-inf: every cached gate is 0, the base mixer alone). Returns
    (w0 (...,), w (..., J)) in z's dtype: residual 1 and 1; grm/soup a softmax over the online and valid cached
    segments; ssc the same over the online and the top_k_segments valid cached ones."""
    if spec.aggregation == "residual":
        return torch.ones_like(z0), valid.to(z.dtype)
    z = z + cached_bias
    keep = valid
    if spec.aggregation == "ssc" and z.shape[-1] > spec.top_k_segments:
        masked = z.masked_fill(~valid, float("-inf"))
        top = masked.topk(spec.top_k_segments, dim=-1).indices
        keep = torch.zeros_like(valid).scatter(-1, top, True) & valid
    elif spec.aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{spec.aggregation}' (choose from {AGGREGATIONS})")
    scores = torch.cat([z0[..., None], z.masked_fill(~keep, float("-inf"))], dim=-1)
    gamma = torch.softmax(scores, dim=-1)
    return gamma[..., 0], gamma[..., 1:]


def token_weights(u_t: torch.Tensor, csum: torch.Tensor, csum_at: dict, n: int, spec: CachingSpec,
                  cached_bias: float = 0.0) -> tuple[list[int], torch.Tensor, torch.Tensor]:  # fmt: skip
    """The per-token references' weights for one token at document position n: u_t (H, D), csum (H, D) the sum of
    desc over the document so far (this token included), csum_at {boundary j: that sum at position j U}. Returns the
    cached boundaries js (host ints, increasing), w0 (H,) and w (H, len(js))."""
    U = spec.segment_size
    c = n // U
    js = [int(j) for j in boundaries(torch.tensor(c), spec.segmentation, width_for(c, spec.segmentation)) if j]
    descs = []
    for j in js:
        s = int(segment_start(torch.tensor(j), spec.segmentation))
        descs.append((csum_at[j] - csum_at[s]) / ((j - s) * U))
    d0 = (csum - csum_at[c]) / (n - c * U + 1)
    z0 = (u_t * d0).sum(-1)  # (H,)
    z = torch.stack([(u_t * d).sum(-1) for d in descs], -1) if js else u_t.new_zeros(u_t.shape[0], 0)
    w0, w = mix_weights(z0, z, torch.ones_like(z, dtype=torch.bool), spec, cached_bias)
    return js, w0, w


def naive_memory_caching(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    desc: torch.Tensor,
    spec: CachingSpec,
    beta: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    cached_bias: float = 0.0,
) -> torch.Tensor:
    """q, k (B, H, T, K); v (B, H, T, V); g (B, H, T, K) or (B, H, T) log-decays; beta (B, H, T) (delta rule) or None;
    u (B, H, T, D) the score queries; desc (B, H, T, D) what segment descriptors average (u or the keys);
    doc_ids (B, T); cached_bias added to the cached segments' scores (`mix_weights`). Returns y (B, H, T, V) in
    q's dtype (the reads before the mixer's output stage)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    U = spec.segment_size
    dt = state_dtype(q)
    out = q.new_zeros(B, H, T, V, dtype=dt)
    for b in range(B):
        n = 0
        for t in range(T):
            if t == 0 or (doc_ids is not None and doc_ids[b, t] != doc_ids[b, t - 1]):
                n, S, csum = 0, q.new_zeros(1, H, K, V, dtype=dt), q.new_zeros(H, u.shape[-1], dtype=dt)
                cached: dict[int, torch.Tensor] = {}
                csum_at = {0: csum.clone()}
            elif spec.state_mode == "independent" and n % U == 0:
                S = torch.zeros_like(S)
            args = [x[b : b + 1, :, t] for x in (q, k, v, g)]
            if beta is None:
                o, S = gated_recurrence_step(S, *args)
            else:
                o, S = gated_delta_step(S, *args, beta[b : b + 1, :, t])
            csum = csum + desc[b, :, t].to(dt)
            js, w0, w = token_weights(u[b, :, t].to(dt), csum, csum_at, n, spec, cached_bias)
            qt = q[b, :, t].to(dt)
            if spec.aggregation == "soup":  # interpolate the memories, then read once
                mixed = w0[:, None, None] * S[0] + sum(w[:, i, None, None] * cached[j] for i, j in enumerate(js))
                y = torch.einsum("hkv,hk->hv", mixed, qt)
            else:
                y = w0[:, None] * o[0].to(dt)
                for i, j in enumerate(js):
                    y = y + w[:, i, None] * torch.einsum("hkv,hk->hv", cached[j], qt)
            out[b, :, t] = y
            if (n + 1) % U == 0:
                cached[(n + 1) // U] = S[0].clone()
                csum_at[(n + 1) // U] = csum.clone()
            n += 1
    return out.to(q.dtype)
