"""Naive per-step reference of the gated linear recurrence (the ground truth for every fast path).

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T        S: (K, V) per (batch, head), kept in fp32 (or fp64)
    o_t = S_t^T q_t

g is a log-decay, either one per key (B, H, T, K) or one scalar per head (B, H, T).
The state is zeroed before every token whose document id differs from the previous token's.
"""

from __future__ import annotations

import torch


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """Recurrent state and accumulation dtype: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def document_index(doc_ids: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(B, T) int32 running count of document starts: a document starts wherever the id changes.

    Every fast path numbers documents this way, so ids need not be increasing or unique per document
    (ids 7, 7, 3, 3, 7 are three documents, as in the per-step rule above).
    """
    if doc_ids is None:
        return torch.zeros(B, T, dtype=torch.int32, device=device)
    if doc_ids.shape != (B, T):
        raise ValueError(f"doc_ids must have shape (batch, time) = {(B, T)}, got {tuple(doc_ids.shape)}")
    starts = torch.zeros(B, T, dtype=torch.int32, device=device)
    starts[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).to(torch.int32)
    return starts.cumsum(1, dtype=torch.int32)


def gated_recurrence_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. state (B, H, K, V); q, k (B, H, K); v (B, H, V); g (B, H, K) or (B, H).

    Returns (o, new_state) with o (B, H, V) in q's dtype and new_state in the state dtype.
    """
    dt = state.dtype
    decay = torch.exp(g.to(dt))
    decay = decay.unsqueeze(-1) if decay.dim() == 3 else decay[..., None, None]
    new_state = decay * state + k.to(dt).unsqueeze(-1) * v.to(dt).unsqueeze(-2)
    o = torch.einsum("bhkv,bhk->bhv", new_state, q.to(dt))
    return o.to(q.dtype), new_state


def naive_gated_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k (B, H, T, K); v (B, H, T, V); g (B, H, T, K) or (B, H, T); doc_ids (B, T)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    dt = state_dtype(q)
    state = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        if doc_ids is not None and t > 0:
            same = (doc_ids[:, t] == doc_ids[:, t - 1]).to(dt)
            state = state * same[:, None, None, None]
        o, state = gated_recurrence_step(state, q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t])
        outs.append(o)
    return torch.stack(outs, dim=2), (state if output_final_state else None)
