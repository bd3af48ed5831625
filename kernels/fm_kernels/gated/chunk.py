"""Chunked (parallel) gated linear recurrence in PyTorch: the CPU path and the reference for kernels.

Same contract as naive.naive_gated_recurrence. The sequence is cut into chunks of C tokens:
inside a chunk the outputs come from a masked (C x C) interaction matrix; across chunks a state of
shape (K, V) is carried in fp32. Every exponent used is a sum of log-decays over a forward range,
hence <= 0, so nothing overflows whatever the decay (no exp(+b) * exp(-b) factorisation).

Document boundaries: with seg = doc_ids, token t sees token s <= t only when seg[t] == seg[s]; it sees
the state carried into its chunk only when seg[t] equals the document of the token before the chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import document_index, state_dtype


def _pad_time(x: torch.Tensor, pad: int, dim: int, value: float = 0.0) -> torch.Tensor:
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - dim - 1) + [0, pad]
    return F.pad(x, widths, value=value)


def chunk_gated_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k (B, H, T, K); v (B, H, T, V); g (B, H, T, K) per-key or (B, H, T) scalar log-decays (<= 0).

    Returns o (B, H, T, V) in q's dtype and, if asked, the final state (B, H, K, V) in fp32/fp64.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    out_dtype, dt = q.dtype, state_dtype(q)
    scalar = g.dim() == 3
    C = min(chunk_size, T)
    pad = (-T) % C
    N = (T + pad) // C
    doc = document_index(doc_ids, B, T, q.device)  # increasing: equal ids mean the same document
    # Padding tokens join the last document with k = 0 and g = 0: they leave the state unchanged.
    seg = torch.cat([doc, doc[:, -1:].expand(B, pad)], dim=1) if pad else doc
    q, k, v, g = (_pad_time(x.to(dt), pad, 2) for x in (q, k, v, g))

    qc = q.reshape(B, H, N, C, K)
    kc = k.reshape(B, H, N, C, K)
    vc = v.reshape(B, H, N, C, V)
    gc = g.reshape(B, H, N, C, *([] if scalar else [K])).cumsum(dim=3)  # inclusive, from chunk start
    segc = seg.reshape(B, 1, N, C)
    seg_prev = torch.cat([seg[:, :1], seg[:, C - 1 :: C][:, : N - 1]], dim=1).reshape(B, 1, N, 1)

    # Intra-chunk: A[t, s] = sum_k q[t,k] k[s,k] exp(gc[t,k] - gc[s,k]) for s <= t in the same document.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    visible = causal & (segc.unsqueeze(-1) == segc.unsqueeze(-2))  # (B, 1, N, C, C)
    if scalar:
        diff = gc.unsqueeze(-1) - gc.unsqueeze(-2)  # (B, H, N, C, C)
        decay = torch.exp(diff.masked_fill(~visible, float("-inf")))
        attn = torch.einsum("bhntk,bhnsk->bhnts", qc, kc) * decay
    else:
        diff = gc.unsqueeze(-2) - gc.unsqueeze(-3)  # (B, H, N, C_t, C_s, K)
        decay = torch.exp(diff.masked_fill(~visible.unsqueeze(-1), float("-inf")))
        attn = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", qc, kc, decay)
    o = torch.einsum("bhnts,bhnsv->bhntv", attn, vc)

    # What each chunk adds to the state, and how the incoming state decays across the chunk.
    g_last = gc[:, :, :, -1:]  # (B, H, N, 1[, K])
    seg_last = segc[..., -1:]
    keep_in = (seg_last == seg_prev).to(dt)  # (B, 1, N, 1): no document starts inside the chunk
    in_last_doc = (segc == seg_last).to(dt)  # (B, 1, N, C): token s still in the chunk's last document
    to_end = torch.exp(g_last - gc) * (in_last_doc if scalar else in_last_doc.unsqueeze(-1))
    if scalar:
        k_to_end = kc * to_end.unsqueeze(-1)
        chunk_decay = (torch.exp(g_last) * keep_in).unsqueeze(-1)  # (B, H, N, 1, 1)
    else:
        k_to_end = kc * to_end
        chunk_decay = (torch.exp(g_last) * keep_in.unsqueeze(-1)).transpose(-1, -2)  # (B, H, N, K, 1)
    chunk_add = torch.einsum("bhnsk,bhnsv->bhnkv", k_to_end, vc)

    # Sequential pass over chunks only (N steps), carrying the fp32 state.
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    states_in = []
    for n in range(N):
        states_in.append(state)
        state = chunk_decay[:, :, n] * state + chunk_add[:, :, n]
    s_in = torch.stack(states_in, dim=2)  # (B, H, N, K, V)

    # Inter-chunk: tokens still in the document that was open before the chunk read the carried state.
    sees_prev = (segc == seg_prev).to(dt)  # (B, 1, N, C)
    q_dec = qc * (torch.exp(gc) * sees_prev).unsqueeze(-1) if scalar else qc * torch.exp(gc) * sees_prev[..., None]
    o = o + torch.einsum("bhntk,bhnkv->bhntv", q_dec, s_in)

    o = o.reshape(B, H, N * C, V)[:, :, :T].to(out_dtype)
    return o, (state if output_final_state else None)
