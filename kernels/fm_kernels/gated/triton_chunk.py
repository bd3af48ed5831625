"""Chunked gated linear recurrence in Triton, forward and backward (same contract as chunk.chunk_gated_recurrence).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t,   g per key (B, H, T, K) or per head (B, H, T)

Forward: in-chunk cumsum G of g -> states entering each chunk (sequential over chunks, fp32) -> intra-chunk
matrix A (sub-chunks, exponents <= 0) -> o = (q exp(G)) h_n + A v. Backward recomputes G, the states and A
(only q, k, v, g, the initial state and the document masks are kept between passes, as flash-linear-attention
does) and uses dg_t = sum_{u >= t in chunk} (q_u dq_u - k_u dk_u) + rowsum(dh_{n+1} * h_{n+1}).
Scalar decays run the per-key kernels with a zero key stride on G, and their dg is summed over keys.
"""

from __future__ import annotations

import torch
import triton

from . import triton_kernels as kern
from .naive import document_index

SUB_CHUNK = 16  # rows of the intra-chunk sub-blocks (tl.dot's minimum tile on GPUs)


def triton_chunk_size(chunk_size: int) -> int:
    """The kernels need a power-of-two chunk in [16, 128]; any chunk gives the same result up to rounding."""
    c = 1 << max(chunk_size, 1).bit_length() - 1
    return min(max(c, SUB_CHUNK), 128)


def _block(n: int, cap: int) -> int:
    return min(max(triton.next_power_of_2(n), 16), cap)


def document_masks(doc_ids: torch.Tensor | None, B: int, T: int, C: int, device: torch.device):
    """Per-token and per-chunk masks for documents: (seg (B, T) int32, sp, ld (B, N*C) fp32, keep (B, N) fp32).

    seg renumbers documents by counting changes of doc_ids, so a document starts wherever the id changes
    (the naive reference's rule, even if an id comes back later).
    """
    N = triton.cdiv(T, C)
    seg = document_index(doc_ids, B, T, device)
    pad = N * C - T
    segc = (torch.cat([seg, seg[:, -1:].expand(B, pad)], dim=1) if pad else seg).view(B, N, C)
    seg_last = segc[:, :, -1]
    seg_prev = torch.cat([seg[:, :1], segc[:, :-1, -1]], dim=1)  # chunk 0: the initial state joins doc 0
    sp = (segc == seg_prev[..., None]).float().view(B, N * C)
    ld = (segc == seg_last[..., None]).float().view(B, N * C)
    keep = (seg_last == seg_prev).float()
    return seg.contiguous(), sp.contiguous(), ld.contiguous(), keep.contiguous()


def _cumsum(x: torch.Tensor, C: int, reverse: bool = False, extra: torch.Tensor | None = None) -> torch.Tensor:
    """In-chunk (suffix) cumsum of x (B, H, T, K) in fp32; extra (B, H, N, K) is added to every suffix sum."""
    B, H, T, K = x.shape
    N = triton.cdiv(T, C)
    out = torch.empty(B, H, T, K, dtype=torch.float32, device=x.device)
    BK = _block(K, 64)  # elementwise: the tile size only sets the grid
    kern.chunk_cumsum_kernel[(triton.cdiv(K, BK), N, B * H)](
        x, out, out if extra is None else extra, T, N, K, C, BK, reverse, extra is not None
    )
    return out


def _g_strides(G: torch.Tensor, scalar: bool) -> tuple[int, int, int]:
    """(per sequence, per token, per key) strides of the cumsum tensor; scalar decays repeat over keys."""
    T = G.shape[2]
    return (T, 1, 0) if scalar else (T * G.shape[3], G.shape[3], 1)


def _states(k, v, G, gs, masks, h0, C, cap: int, with_final_slot: bool):
    """States entering each chunk (B, H, N[+1], K, V) fp32 and the final state (a view of the last slot or its own)."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, C)
    _, _, ld, keep = masks
    slots = N + 1 if with_final_slot else N
    h = torch.empty(B, H, slots, K, V, dtype=torch.float32, device=k.device)
    ht = h[:, :, N] if with_final_slot else torch.empty(B, H, K, V, dtype=torch.float32, device=k.device)
    BK, BV = _block(K, cap), _block(V, cap)
    kern.fwd_state_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
        k, v, G, ld, keep, h0 if h0 is not None else h, h, ht, T, N, H, *gs, slots * K * V,
        slots * K * V if with_final_slot else K * V, K, V, C, BK, BV, h0 is not None,
    )  # fmt: skip
    return h, ht


def _intra(q, k, G, gs, seg, C, cap: int) -> torch.Tensor:
    B, H, T, K = q.shape
    N, NC = triton.cdiv(T, C), C // SUB_CHUNK
    A = torch.empty(B, H, N, C, C, dtype=torch.float32, device=q.device)
    kern.fwd_intra_kernel[(N * NC, B * H)](q, k, G, seg, A, T, N, H, *gs, K, C, SUB_CHUNK, _block(K, cap), NC)
    return A


class ChunkGatedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, seg, sp, ld, keep, C: int, cap: int):
        B, H, T, K = q.shape
        V = v.shape[-1]
        N = triton.cdiv(T, C)
        scalar = g.dim() == 3
        masks = (seg, sp, ld, keep)
        G = _cumsum(g.unsqueeze(-1) if scalar else g, C)
        gs = _g_strides(G, scalar)
        h, ht = _states(k, v, G, gs, masks, h0, C, cap, with_final_slot=False)
        A = _intra(q, k, G, gs, seg, C, cap)
        o = torch.empty_like(v, dtype=q.dtype)
        BK, BV = _block(K, cap), _block(V, cap)
        kern.fwd_out_kernel[(triton.cdiv(V, BV), N, B * H)](
            q, v, G, sp, h, A, o, T, N, H, *gs, N * K * V, K, V, C, BK, BV
        )
        ctx.save_for_backward(q, k, v, g, h0, seg, sp, ld, keep)
        ctx.chunk, ctx.cap = C, cap
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, seg, sp, ld, keep = ctx.saved_tensors
        C, cap = ctx.chunk, ctx.cap
        B, H, T, K = q.shape
        V = v.shape[-1]
        N, NC = triton.cdiv(T, C), C // SUB_CHUNK
        scalar = g.dim() == 3
        BK, BV = _block(K, cap), _block(V, cap)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        G = _cumsum(g.unsqueeze(-1) if scalar else g, C)
        gs = _g_strides(G, scalar)
        h, _ = _states(k, v, G, gs, (seg, sp, ld, keep), h0, C, cap, with_final_slot=True)
        A = _intra(q, k, G, gs, seg, C, cap)

        dh = torch.empty(B, H, N, K, V, dtype=torch.float32, device=q.device)
        dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
        kern.bwd_state_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
            q, do, G, sp, keep, dh if dht is None else dht.contiguous(), dh, dh0, T, N, H, *gs,
            K, V, C, BK, BV, dht is not None,
        )  # fmt: skip
        dA = torch.empty(B, H, N, C, C, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(v)
        kern.bwd_dv_kernel[(N, B * H)](k, v, G, ld, seg, A, do, dh, dA, dv, T, N, H, *gs, K, V, C, BK, BV)
        dq_state = torch.empty(B, H, T, K, dtype=torch.float32, device=q.device)
        dk_state = torch.empty_like(dq_state)
        extra = torch.empty(B, H, N, K, dtype=torch.float32, device=q.device)
        kern.bwd_inter_kernel[(triton.cdiv(K, BK), N, B * H)](
            v, G, sp, ld, h, dh, do, dq_state, dk_state, extra, T, N, H, *gs, K, V, C, BK, BV
        )
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dG = torch.empty_like(dq_state)
        kern.bwd_intra_kernel[(triton.cdiv(K, BK), N * NC, B * H)](
            q, k, G, dA, dq_state, dk_state, dq, dk, dG, T, N, *gs, K, C, SUB_CHUNK, BK, NC
        )
        if scalar:
            dG, extra = dG.sum(-1, keepdim=True), extra.sum(-1, keepdim=True)
        dg = _cumsum(dG, C, reverse=True, extra=extra)
        dg = dg.squeeze(-1) if scalar else dg
        return dq, dk, dv, dg.to(g.dtype), (dh0 if h0 is not None else None), *[None] * 6


def triton_gated_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as chunk.chunk_gated_recurrence; inputs fp32, bf16 or fp16 (fp64 has the PyTorch paths).

    block_size caps the key and value tiles (a power of two >= 16); keys and values wider than it are split.
    """
    if q.dtype == torch.float64:
        raise TypeError("triton_gated_recurrence: fp64 inputs are not supported; use the 'torch' backend")
    B, H, T, K = q.shape
    if T == 0:
        raise ValueError("triton_gated_recurrence: empty sequence (T = 0)")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"triton_gated_recurrence: block_size={block_size} must be a power of two >= 16")
    C = triton_chunk_size(chunk_size)
    masks = document_masks(doc_ids, B, T, C, q.device)
    k, v, g = k.to(q.dtype), v.to(q.dtype), g.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, final = ChunkGatedRecurrence.apply(q.contiguous(), k.contiguous(), v.contiguous(), g, h0, *masks, C, block_size)
    return o, (final if output_final_state else None)
