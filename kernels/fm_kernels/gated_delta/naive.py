"""Gated delta rule (Gated DeltaNet, Yang et al. 2024) written per step: the ground truth for every fast path.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   a_t = exp(g_t),   o_t = S_t^T q_t

per (batch, head), state S (K, V) in fp32 (fp64 for fp64 inputs), g one log-decay per head and token (<= 0),
beta in [0, 1]. The state is zeroed before every token whose document id differs from the previous token's.
The layer L2-normalises q and k and scales q; this op takes them as given.
"""

from __future__ import annotations

import torch

from ..gated.naive import state_dtype


def gated_delta_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. state (B, H, K, V); q, k (B, H, K); v (B, H, V); g, beta (B, H).

    Returns (o, new_state): o (B, H, V) in q's dtype, new_state in the state's dtype.
    """
    dt, out_dtype = state.dtype, q.dtype
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    a = torch.exp(g)[..., None, None]
    b = beta[..., None, None]
    k_col = k.unsqueeze(-1)  # (B, H, K, 1)
    kS = k_col.transpose(-1, -2) @ state  # k^T S: (B, H, 1, V)
    new_state = a * (state - b * k_col @ kS) + b * k_col @ v.unsqueeze(-2)
    o = (new_state.transpose(-1, -2) @ q.unsqueeze(-1)).squeeze(-1)
    return o.to(out_dtype), new_state


def naive_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k (B, H, T, K); v (B, H, T, V); g, beta (B, H, T); doc_ids (B, T); initial_state (B, H, K, V).

    Returns o (B, H, T, V) in q's dtype and, if asked, the final state (B, H, K, V) in fp32 (fp64 for fp64).
    """
    B, H, T, K = q.shape
    dt = state_dtype(q)
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        if doc_ids is not None and t > 0:
            state = state * (doc_ids[:, t] == doc_ids[:, t - 1]).to(dt)[:, None, None, None]
        o, state = gated_delta_step(state, q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t])
        outs.append(o)
    return torch.stack(outs, dim=2).to(q.dtype), (state if output_final_state else None)
