"""Mixture-of-Memories written literally, per token and over all M memories: the ground truth (dense, O(M) per token).

Per (batch, head), M memories S^j (K x V) and the token's routing weights w_t (M,) with k non-zeros:

    a memory j with w_t[j] != 0 (routed):  S^j_t = update(S^j_{t-1}; k^j_t, v^j_t, g^j_t[, beta^j_t])
    a memory j with w_t[j] == 0:           S^j_t = S^j_{t-1}      (no decay, no write: exactly unchanged)
    o_t = sum_j w_t[j] (S^j_t)^T q_t

with update the gated rule exp(g) S + k v^T (beta None) or the gated delta rule exp(g) (I - beta k k^T) S +
beta k v^T. Every memory is zeroed at every document start. The shared memory is not part of this op (it is an
ordinary single-memory recurrence the layer adds).
"""

from __future__ import annotations

import torch

from ..gated.naive import gated_recurrence_step, state_dtype
from ..gated_delta.naive import gated_delta_step


def naive_mom(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    weights: torch.Tensor,
    beta: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, T, K); k (B, M, H, T, K), v (B, M, H, T, V): every memory's keys and values at every token;
    g (B, M, H, T, K) per-key or (B, M, H, T) per-head log-decays; beta (B, M, H, T) (delta rule) or None;
    weights (B, T, M): the routing weights, zero at memories the token is not routed to; doc_ids (B, T);
    initial_state (B, M, H, K, V). Returns o (B, H, T, V) in q's dtype and, if asked, the final state
    (B, M, H, K, V) in fp32 (fp64 for fp64)."""
    B, M, H, T, K = k.shape
    V = v.shape[-1]
    dt = state_dtype(q)
    state = q.new_zeros(B, M, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        if doc_ids is not None and t > 0:
            state = state * (doc_ids[:, t] == doc_ids[:, t - 1]).to(dt)[:, None, None, None, None]
        o_t = q.new_zeros(B, H, V, dtype=dt)
        new_states = []
        for j in range(M):
            if beta is None:
                o_j, s_j = gated_recurrence_step(state[:, j], q[:, :, t], k[:, j, :, t], v[:, j, :, t], g[:, j, :, t])
            else:
                o_j, s_j = gated_delta_step(
                    state[:, j], q[:, :, t], k[:, j, :, t], v[:, j, :, t], g[:, j, :, t], beta[:, j, :, t]
                )
            routed = (weights[:, t, j] != 0)[:, None, None, None]
            new_states.append(torch.where(routed, s_j, state[:, j]))
            o_t = o_t + weights[:, t, j].to(dt)[:, None, None] * o_j.to(dt) * routed[..., 0]
        state = torch.stack(new_states, dim=1)
        outs.append(o_t)
    return torch.stack(outs, dim=2).to(q.dtype), (state if output_final_state else None)
