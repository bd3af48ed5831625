"""Triton kernels for sparse FM training: a segmented gated scan over the (token, row) pairs, grouped by row.

`sparse.sort_pairs` sorts each head's T*k pairs by (row, time). One program per (batch*head, row, column
tile) walks its row's segment in blocks of BLOCK pairs. Within a block the recurrence
h_s = a_s h_{s-1} + theta_s xbar_s, with a_s = keep_s (1 - theta_s), is an associative scan over affine maps
(a, b); the carry between blocks is the state itself. Each pair adds phi_s h_s to its token's read with an
atomic add (a token's k pairs live in k different programs), so the work is O(T k d_mem) whatever m is.

Backward walks the blocks in reverse. The forward stores the state entering every block (a checkpoint per
block, O(T k d_mem / BLOCK) memory), from which the backward recomputes the block's states; the adjoint
g_s = phi_s dr_{t_s} + a_{s+1} g_{s+1} is a reverse associative scan with the same combine. Then
dphi_s = <dr_t, h_s>, dtheta_s = <g_s, xbar_s - keep_s h_{s-1}>, dxbar_t += theta_s g_s, and the initial
state's gradient is a_first g_first. State and accumulation are fp32 (fp64 for fp64 inputs); inputs are
upcast right after loading (the interpreter mishandles bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gated.naive import state_dtype
from .sparse import RoutedPairs, check_sparse_inputs, sort_pairs


@triton.jit
def _affine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1, then h -> a2 h + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _affine_with_prefix(a1, b1, pa1, pb1, a2, b2, pa2, pb2):
    """Like _affine, and also carry the composition of all but the last element (the map to h_{s-1})."""
    return a1 * a2, a2 * b1 + b2, a1 * pa2, pa2 * b1 + pb2


@triton.jit
def _load_pairs(PERM, SEG, THETA, PHI, i, start, end, K, ACC: tl.constexpr):
    """Sorted entries i of one row's segment: validity, pair, token, document, theta, phi, keep and decay a.

    keep is 0 where a document started since the row's previous pair (the row's first pair compares with
    document 0, the document of the initial state). Lanes past the segment get the identity (a=1, theta=0).
    """
    valid = i < end
    p = tl.load(PERM + i, mask=valid, other=0)
    tok = p // K
    doc = tl.load(SEG + tok, mask=valid, other=0)
    has_prev = valid & (i > start)
    prev_doc = tl.load(SEG + tl.load(PERM + i - 1, mask=has_prev, other=0) // K, mask=has_prev, other=0)
    th = tl.load(THETA + p, mask=valid, other=0).to(ACC)
    ph = tl.load(PHI + p, mask=valid, other=0).to(ACC)
    keep = tl.where(valid & (doc != prev_doc), 0.0, 1.0).to(ACC)
    return valid, p, tok, doc, th, ph, keep, keep * (1.0 - th)


@triton.jit
def _sparse_fm_fwd_kernel(
    PERM, OFFS, BLKOFF, SEG, THETA, PHI, X, H0, R, HT, CKPT,
    T, K, M, H, D, NBMAX,
    BLOCK: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    STORE_CKPT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    cols = tl.program_id(2) * BD + tl.arange(0, BD)
    cmask = cols < D
    lane = tl.arange(0, BLOCK)
    b = bh // H
    P = T * K
    start = tl.load(OFFS + bh * (M + 1) + row)
    end = tl.load(OFFS + bh * (M + 1) + row + 1)
    state_off = (bh * M + row) * D + cols
    if HAS_H0:
        h = tl.load(H0 + state_off, mask=cmask, other=0.0).to(ACC)
    else:
        h = tl.zeros([BD], dtype=ACC)
    h_doc = start * 0  # document of the state h (the initial state's is 0)
    blk = tl.load(BLKOFF + bh * M + row).to(tl.int64)
    for s0 in range(start, end, BLOCK):
        valid, p, tok, doc, th, ph, keep, a = _load_pairs(
            PERM + bh * P, SEG + b * T, THETA + bh * P, PHI + bh * P, s0 + lane, start, end, K, ACC
        )
        xo = (bh * T + tok)[:, None] * D + cols[None, :]
        m2 = valid[:, None] & cmask[None, :]
        x = tl.load(X + xo, mask=m2, other=0.0).to(ACC)
        if STORE_CKPT:
            tl.store(CKPT + (bh * NBMAX + blk) * D + cols, h, mask=cmask)
            blk += 1
        A, Bc = tl.associative_scan((tl.broadcast_to(a[:, None], (BLOCK, BD)), th[:, None] * x), 0, _affine)
        hs = A * h[None, :] + Bc
        tl.atomic_add(R + xo, ph[:, None] * hs, mask=m2)
        h = tl.sum(tl.where(lane[:, None] == BLOCK - 1, hs, 0.0), axis=0)  # padded lanes pass h through
        h_doc = tl.max(tl.where(valid, doc, -1), axis=0)
    if STORE_HT:  # a row not written in the last document was reset at its start
        last_doc = tl.load(SEG + b * T + T - 1)
        tl.store(HT + state_off, tl.where(h_doc == last_doc, h, 0.0), mask=cmask)


@triton.jit
def _sparse_fm_bwd_kernel(
    PERM, OFFS, BLKOFF, SEG, THETA, PHI, X, DR, DHT, CKPT, DTHETA, DPHI, DX, DH0,
    T, K, M, H, D, NBMAX,
    BLOCK: tl.constexpr, BD: tl.constexpr, HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    tile = tl.program_id(2)
    cols = tile * BD + tl.arange(0, BD)
    cmask = cols < D
    lane = tl.arange(0, BLOCK)
    b = bh // H
    P = T * K
    PERM_h, SEG_b, THETA_h, PHI_h = PERM + bh * P, SEG + b * T, THETA + bh * P, PHI + bh * P
    start = tl.load(OFFS + bh * (M + 1) + row)
    end = tl.load(OFFS + bh * (M + 1) + row + 1)
    last_doc = tl.load(SEG_b + T - 1)
    state_off = (bh * M + row) * D + cols
    if HAS_DHT:  # adjoint of the state after the row's last pair
        g = tl.load(DHT + state_off, mask=cmask, other=0.0).to(ACC)
    else:
        g = tl.zeros([BD], dtype=ACC)
    blk0 = tl.load(BLKOFF + bh * M + row).to(tl.int64)
    n_blk = tl.cdiv(end - start, BLOCK)
    for jj in range(0, n_blk):
        jb = n_blk - 1 - jj
        i = start + jb * BLOCK + lane
        valid, p, tok, doc, th, ph, keep, a = _load_pairs(PERM_h, SEG_b, THETA_h, PHI_h, i, start, end, K, ACC)
        xo = (bh * T + tok)[:, None] * D + cols[None, :]
        m2 = valid[:, None] & cmask[None, :]
        x = tl.load(X + xo, mask=m2, other=0.0).to(ACC)
        dy = tl.load(DR + xo, mask=m2, other=0.0).to(ACC)
        h_in = tl.load(CKPT + (bh * NBMAX + blk0 + jb) * D + cols, mask=cmask, other=0.0)

        # Recompute the block's states h_s and h_{s-1} from the checkpoint.
        ones = tl.full([BLOCK, BD], 1.0, ACC)
        A, Bc, PA, PB = tl.associative_scan(
            (tl.broadcast_to(a[:, None], (BLOCK, BD)), th[:, None] * x, ones, ones * 0.0), 0, _affine_with_prefix
        )
        hs = A * h_in[None, :] + Bc
        h_prev = PA * h_in[None, :] + PB

        # alpha_s = a_{s+1}: the next pair's decay; after the last pair, whether the row's state reaches the
        # final state (written in the last document).
        has_next = (i + 1) < end
        p_n = tl.load(PERM_h + i + 1, mask=has_next, other=0)
        doc_n = tl.load(SEG_b + p_n // K, mask=has_next, other=0)
        th_n = tl.load(THETA_h + p_n, mask=has_next, other=0).to(ACC)
        alpha = tl.where(has_next, tl.where(doc_n == doc, 1.0 - th_n, 0.0), tl.where(doc == last_doc, 1.0, 0.0))
        alpha = tl.where(valid, alpha, 1.0)
        Ar, Br = tl.associative_scan(
            (tl.broadcast_to(alpha[:, None], (BLOCK, BD)), ph[:, None] * dy), 0, _affine, reverse=True
        )
        G = Ar * g[None, :] + Br  # adjoint of h_s

        out = tile * (T * K * tl.num_programs(0)) + bh * P + p
        tl.store(DPHI + out, tl.sum(dy * hs, axis=1), mask=valid)
        tl.store(DTHETA + out, tl.sum(G * (x - keep[:, None] * h_prev), axis=1), mask=valid)
        tl.atomic_add(DX + xo, th[:, None] * G, mask=m2)
        g = tl.sum(tl.where(lane[:, None] == 0, G, 0.0), axis=0)
    if HAS_H0:  # the initial state enters through the row's first pair, or straight into the final state
        has = start < end
        p0 = tl.load(PERM_h + start, mask=has, other=0)
        doc0 = tl.load(SEG_b + p0 // K, mask=has, other=0)
        th0 = tl.load(THETA_h + p0, mask=has, other=0).to(ACC)
        coef = tl.where(has, tl.where(doc0 == 0, 1.0 - th0, 0.0), tl.where(last_doc == 0, 1.0, 0.0))
        tl.store(DH0 + state_off, coef * g, mask=cmask)


def _acc_dtype(x: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    dt = state_dtype(x)
    return dt, (tl.float64 if dt == torch.float64 else tl.float32)


def _block_sizes(d_mem: int, block: int, block_d: int | None) -> tuple[int, int]:
    if block < 1 or block & (block - 1):
        raise ValueError(f"sparse FM kernel: block must be a power of two, got {block}")
    bd = block_d or min(64, triton.next_power_of_2(d_mem))
    if bd & (bd - 1):
        raise ValueError(f"sparse FM kernel: block_d must be a power of two, got {bd}")
    return block, bd


class _SparseFM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta_k, phi_k, xbar, initial_state, pairs: RoutedPairs, m: int, want_final: bool, block, bd):
        B, H, T, k = theta_k.shape
        d = xbar.shape[-1]
        dt, acc = _acc_dtype(theta_k)
        BH, P = B * H, T * k
        theta_k, phi_k, xbar = theta_k.contiguous(), phi_k.contiguous(), xbar.contiguous()
        h0 = initial_state.contiguous() if initial_state is not None else None
        lens = pairs.offsets[:, 1:] - pairs.offsets[:, :-1]
        n_blocks = (lens + block - 1) // block
        blkoff = (n_blocks.cumsum(1) - n_blocks).to(torch.int32)  # first checkpoint slot of each row
        nbmax = P // block + min(m, P)  # >= sum over rows of ceil(len / block)
        needs_grad = any(ctx.needs_input_grad[:4])
        r = xbar.new_zeros(B, H, T, d, dtype=dt)
        # Unused pointer arguments get a real tensor (`r`): an empty one has no device address on CUDA.
        ckpt = xbar.new_empty(BH, nbmax, d, dtype=dt) if needs_grad else r
        final = xbar.new_empty(B, H, m, d, dtype=dt) if want_final else r
        grid = (BH, m, triton.cdiv(d, bd))
        _sparse_fm_fwd_kernel[grid](
            pairs.perm, pairs.offsets, blkoff, pairs.seg, theta_k, phi_k, xbar, h0 if h0 is not None else xbar,
            r, final, ckpt, T, k, m, H, d, nbmax,
            BLOCK=block, BD=bd, HAS_H0=h0 is not None, STORE_HT=want_final, STORE_CKPT=needs_grad, ACC=acc,
        )  # fmt: skip
        ctx.save_for_backward(theta_k, phi_k, xbar, ckpt, pairs.perm, pairs.offsets, blkoff, pairs.seg)
        ctx.meta = (m, nbmax, block, bd, want_final, h0 is not None, h0.dtype if h0 is not None else None)
        return r.to(xbar.dtype), (final if want_final else xbar.new_empty(0, dtype=dt))

    @staticmethod
    def backward(ctx, dr, dfinal):
        theta_k, phi_k, xbar, ckpt, perm, offsets, blkoff, seg = ctx.saved_tensors
        m, nbmax, block, bd, want_final, has_h0, h0_dtype = ctx.meta
        B, H, T, k = theta_k.shape
        d = xbar.shape[-1]
        dt, acc = _acc_dtype(theta_k)
        n_tiles = triton.cdiv(d, bd)
        has_dht = want_final and dfinal is not None
        dtheta = theta_k.new_empty(n_tiles, B, H, T, k, dtype=dt)  # partial sums over column tiles
        dphi = torch.empty_like(dtheta)
        dx = xbar.new_zeros(B, H, T, d, dtype=dt)
        dh0 = xbar.new_empty(B, H, m, d, dtype=dt) if has_h0 else dx  # dx: a placeholder, never written
        _sparse_fm_bwd_kernel[(B * H, m, n_tiles)](
            perm, offsets, blkoff, seg, theta_k, phi_k, xbar, dr.contiguous(),
            dfinal.contiguous() if has_dht else dx, ckpt, dtheta, dphi, dx, dh0,
            T, k, m, H, d, nbmax,
            BLOCK=block, BD=bd, HAS_DHT=has_dht, HAS_H0=has_h0, ACC=acc,
        )  # fmt: skip
        return (
            dtheta.sum(0).to(theta_k.dtype),
            dphi.sum(0).to(phi_k.dtype),
            dx.to(xbar.dtype),
            dh0.to(h0_dtype) if has_h0 else None,
            None,
            None,
            None,
            None,
            None,
        )


def sparse_fm_triton(
    rows: torch.Tensor,
    theta_k: torch.Tensor,
    phi_k: torch.Tensor,
    xbar: torch.Tensor,
    n_memories: int,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    block: int = 32,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `sparse.sparse_fm_reference`, differentiable in theta_k, phi_k, xbar, initial_state.

    block: pairs per scan step (power of two); block_d: state columns per program (default min(64, d_mem)).
    Rows must be distinct per token (as top-k gives); out-of-range rows are ignored.
    """
    check_sparse_inputs(rows, theta_k, phi_k, xbar, n_memories)
    B, H, T, _ = rows.shape
    if initial_state is not None and initial_state.shape != (B, H, n_memories, xbar.shape[-1]):
        raise ValueError(
            f"sparse FM: initial_state must be {(B, H, n_memories, xbar.shape[-1])}, got {tuple(initial_state.shape)}"
        )
    pairs = sort_pairs(rows, n_memories, doc_ids)
    block, bd = _block_sizes(xbar.shape[-1], block, block_d)
    r, final = _SparseFM.apply(theta_k, phi_k, xbar, initial_state, pairs, n_memories, output_final_state, block, bd)
    return r, (final if output_final_state else None)
