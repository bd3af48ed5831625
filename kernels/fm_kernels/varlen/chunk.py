"""Chunked scan of a linear memory over variable-length sequences (PyTorch), for two update rules:

    gated (GLA, FM, Mamba-2):  S_t = exp(g_t) S_{t-1} + k_t v_t^T                      g per key or per head
    gated delta (DeltaNet):    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  a_t = exp(g_t), g per head

read o_t = S_t^T q_t, state S (K, V) in fp32 (fp64 for fp64 inputs), reset to 0 at every document start.

Both rules are "decay the state, then add k_t u_t^T" with u_t = v_t (gated) or, for the delta rule,
u_t = beta_t (v_t - a_t S_{t-1}^T k_t). Inside a chunk of C slots with in-chunk inclusive cumulative
log-decays G (so a_t a_{t-1} ... a_{s+1} = exp(G_t - G_s)) and incoming state S_0:

    delta rule:  u_t + sum_{s<t} beta_t exp(G_t - G_s) (k_t . k_s) u_s = beta_t v_t - beta_t exp(G_t) S_0^T k_t
                 i.e. (I + A) U = diag(beta) V - diag(beta exp(G)) K S_0 with A strictly lower triangular:
                 U = U0 - W S_0,  U0 = (I + A)^-1 diag(beta) V,  W = (I + A)^-1 diag(beta exp(G)) K
                 (the "UT transform" of DeltaNet's WY representation; one triangular solve per chunk)
    both:        o_t = exp(G_t) S_0^T q_t + sum_{s<=t} exp(G_t - G_s) (q_t . k_s) u_s
                 S_C = exp(G_C) S_0 + sum_s exp(G_C - G_s) k_s u_s^T

(per-key decays put exp(G) inside the dot products instead). Every exponent is a sum of log-decays over a
forward range, hence <= 0. Documents: pairs (t, s) of different documents are masked out of A and of the
in-chunk read, only slots of the document that was open before the chunk see S_0, and only slots of the
chunk's last document reach S_C (S_0 too, only if no document starts inside the chunk).

Everything but the state recurrence is batched over all chunks; the recurrence over chunks is a loop of
max-chunks-per-sequence steps, each advancing every sequence by one chunk (`VarlenLayout.steps`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..gated.naive import state_dtype
from .layout import VarlenLayout


class ScanResult(NamedTuple):
    o: torch.Tensor
    """(Nc, H, C, V) reads in q's dtype (values at padding slots are meaningless)."""
    final_state: torch.Tensor | None
    """(n_seq, H, K, V) fp32/fp64 state after each sequence's last chunk (0 if `final_doc` says that the state
    belongs to an earlier document); None unless asked."""
    chunk_states: torch.Tensor | None
    """(Nc, H, K, V) the state entering each chunk (before the document mask of its first slots); None unless
    asked."""


def varlen_chunk_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    layout: VarlenLayout,
    beta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    final_doc: torch.Tensor | None = None,
    output_final_state: bool = False,
    output_chunk_states: bool = False,
) -> ScanResult:
    """q, k (Nc, H, C, K); v (Nc, H, C, V); g (Nc, H, C, K) per-key or (Nc, H, C) per-head log-decays (<= 0);
    beta (Nc, H, C) in [0, 1] selects the delta rule (per-head g only), None the gated rule; initial_state
    (n_seq, H, K, V) (it belongs to document `doc0` of its sequence, see `build_layout`); final_doc (n_seq,):
    the document whose end the final state stands for (the state of a sequence whose last document is an
    earlier one is 0), default: no masking. Padding slots must hold zeros (as `to_chunks` gives).
    """
    Nc, H, C, K = q.shape
    V = v.shape[-1]
    dt, out_dtype = state_dtype(q), q.dtype
    scalar = g.dim() == 3
    if beta is not None and not scalar:
        raise ValueError("varlen_chunk_scan: the delta rule takes one log-decay per head, g (Nc, H, C)")
    q, k, v, g = (x.to(dt) for x in (q, k, v, g))
    gc = g.cumsum(2)
    doc = layout.slot_doc
    same = doc[:, :, None] == doc[:, None, :]  # (Nc, C, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    vis = (same & causal)[:, None]  # (Nc, 1, C, C): s <= t in one document
    if scalar:
        diff = gc[..., :, None] - gc[..., None, :]  # (Nc, H, C, C)
        attn = (q @ k.transpose(-1, -2)) * torch.exp(diff.masked_fill(~vis, float("-inf")))
    else:
        diff = gc[:, :, :, None, :] - gc[:, :, None, :, :]  # (Nc, H, C_t, C_s, K)
        decay = torch.exp(diff.masked_fill(~vis[..., None], float("-inf")))
        attn = torch.einsum("nhtk,nhsk,nhtsk->nhts", q, k, decay)
    sees_in = (doc == layout.doc_in[:, None]).to(dt)  # (Nc, C)
    in_last = (doc == doc[:, -1:]).to(dt)
    keep_in = (doc[:, -1] == layout.doc_in).to(dt)  # (Nc,): no document starts inside the chunk
    g_last = gc[:, :, -1]  # (Nc, H) or (Nc, H, K)
    if scalar:
        q_dec = q * (torch.exp(gc) * sees_in[:, None])[..., None]
        k_end = k * (torch.exp(g_last[..., None] - gc) * in_last[:, None])[..., None]
        chunk_decay = (torch.exp(g_last) * keep_in[:, None])[..., None, None]  # (Nc, H, 1, 1)
    else:
        q_dec = q * torch.exp(gc) * sees_in[:, None, :, None]
        k_end = k * torch.exp(g_last[:, :, None, :] - gc) * in_last[:, None, :, None]
        chunk_decay = (torch.exp(g_last) * keep_in[:, None, None])[..., None]  # (Nc, H, K, 1)
    W = None
    u0 = v
    if beta is not None:
        beta = beta.to(dt)
        strict = (same & torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1))[:, None]
        a_kk = (k @ k.transpose(-1, -2)) * torch.exp(diff.masked_fill(~strict, float("-inf"))) * beta[..., None]
        rhs = torch.cat([k * (beta * torch.exp(gc) * sees_in[:, None])[..., None], v * beta[..., None]], dim=-1)
        sol = torch.linalg.solve_triangular(a_kk, rhs, upper=False, unitriangular=True)  # (I + A)^-1 rhs
        W, u0 = sol.split([K, V], dim=-1)

    state = q.new_zeros(layout.n_seq, H, K, V) if initial_state is None else initial_state.to(dt)
    if layout.steps:
        # Reorder the chunk tensors once into step order and slice them per step: indexing the full tensors inside
        # the loop would make every step's backward scatter into a full-size gradient (quadratic in the chunks).
        order = torch.cat(layout.steps)
        sizes = [len(idx) for idx in layout.steps]
        seqs_by_step = layout.chunk_seq[order].split(sizes)
        decay_by_step = chunk_decay[order].split(sizes)
        k_end_by_step = k_end[order].transpose(-1, -2).split(sizes)
        u0_by_step = u0[order].split(sizes)
        w_by_step = W[order].split(sizes) if W is not None else [None] * len(sizes)
        s_parts, u_parts = [], []
        for seqs, decay, k_end_t, u0_j, w_j in zip(seqs_by_step, decay_by_step, k_end_by_step, u0_by_step, w_by_step):
            s_in = state[seqs]  # (n, H, K, V)
            u = u0_j if w_j is None else u0_j - w_j @ s_in
            state = state.index_copy(0, seqs, decay * s_in + k_end_t @ u)
            s_parts.append(s_in)
            u_parts.append(u)
        inverse = torch.argsort(order)
        s_chunks = torch.cat(s_parts)[inverse]
        u = torch.cat(u_parts)[inverse] if W is not None else u0
        o = q_dec @ s_chunks + attn @ u
    else:
        s_chunks = q.new_zeros(0, H, K, V)
        o = q.new_zeros(0, H, C, V)
    final = None
    if output_final_state:
        final = state
        if final_doc is not None:
            final = state * (layout.state_doc == final_doc).to(dt)[:, None, None, None]
    return ScanResult(o=o.to(out_dtype), final_state=final, chunk_states=s_chunks if output_chunk_states else None)
