"""Chunked gated linear recurrence in Triton, forward and backward (same contract as chunk.chunk_gated_recurrence).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t,   g per key (B, H, T, K) or per head (B, H, T)

Forward: in-chunk cumsum G of g -> states entering each chunk (sequential over chunks, fp32) -> intra-chunk
matrix A (sub-chunks, exponents <= 0) -> o = (q exp(G)) h_n + A v. Backward recomputes G, the states and A
(only q, k, v, g, the initial state and the document masks are kept between passes, as flash-linear-attention
does) and uses dg_t = sum_{u >= t in chunk} (q_u dq_u - k_u dk_u) + rowsum(dh_{n+1} * h_{n+1}).
Scalar decays run the per-key kernels with a zero key stride on G, and their dg is summed over keys.

Kernel notation, per (batch, head) sequence cut into chunks of C tokens: G = in-chunk inclusive cumsum of the
log-decays g (fp32), L = the chunk's last real token, h_n = the (K, V) fp32 state entering chunk n.
Document masks come precomputed per token: sp (token sees the state entering its chunk), ld (token lies
in its chunk's last document, so it reaches the outgoing state) and per chunk keep (no document starts
inside it). Intra-chunk decays use sub-chunks of BC tokens with a reference row between the two tokens,
so every exponent is <= 0: exp(G_t - G_s) = exp(G_t - G_r) * exp(G_r - G_s) with s <= r <= t.

All loads are upcast to fp32 (the interpreter mishandles bf16 arithmetic; decays need fp32 anyway); tl.dot
operands are cast to the inputs' dtype (bf16 tensor cores on GPU) and accumulate in fp32.
G is addressed through strides (s_gbh, s_gt, s_gk): s_gk = 0 serves the scalar per-head decay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import document_index

SUB_CHUNK = 16  # rows of the intra-chunk sub-blocks (tl.dot's minimum tile on GPUs)

# ---------------------------------------------------------------- the kernels (@triton.jit)


@triton.jit
def _exp_le0(x):
    # Every decay exponent is <= 0 in exact arithmetic; the clamp absorbs rounding and masked-out lanes.
    return tl.exp(tl.minimum(x, 0.0))


@triton.jit
def _tile(ptr, base, rows, cols, n_rows, n_cols, s_row, s_col):
    """fp32 (len(rows), len(cols)) tile of a row-major slab, zero outside [0, n_rows) x [0, n_cols)."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + base + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row(ptr, base, row, cols, n_rows, n_cols, s_row, s_col):
    """fp32 vector of one row (zero when the row or a column is out of range)."""
    mask = (cols < n_cols) & (row < n_rows)
    return tl.load(ptr + base + row * s_row + cols * s_col, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def chunk_cumsum_kernel(
    x_ptr, out_ptr, extra_ptr, T, N, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    REVERSE: tl.constexpr, HAS_EXTRA: tl.constexpr,
):  # fmt: skip
    """In-chunk cumsum of x (BH, T, K); REVERSE: suffix sums, plus extra (BH, N, K) on every row."""
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = i_n * C + tl.arange(0, C)
    cols = i_k * BK + tl.arange(0, BK)
    base = i_bh.to(tl.int64) * T * K
    x = _tile(x_ptr, base, rows, cols, T, K, K, 1)
    c = tl.cumsum(x, axis=0)
    if REVERSE:
        c = tl.sum(x, axis=0)[None, :] - c + x
        if HAS_EXTRA:
            c += _row(extra_ptr, (i_bh.to(tl.int64) * N + i_n) * K, 0, cols, 1, K, 0, 1)[None, :]
    mask = (rows < T)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + base + rows[:, None] * K + cols[None, :], c, mask=mask)


@triton.jit
def fwd_state_kernel(
    k_ptr, v_ptr, g_ptr, ld_ptr, keep_ptr, h0_ptr, h_ptr, ht_ptr, T, N, H, s_gbh, s_gt, s_gk, s_hbh, s_htbh,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
):  # fmt: skip
    """h[n] = state entering chunk n (fp32), ht = final state: h_{n+1} = exp(G_L) keep h_n + (k exp(G_L-G) ld)^T v."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // H
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    r = tl.arange(0, C)
    bh = i_bh.to(tl.int64)
    hmask = (ck < K)[:, None] & (cv < V)[None, :]
    hoff = ck[:, None] * V + cv[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + bh * K * V + hoff, mask=hmask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(N):
        tl.store(h_ptr + bh * s_hbh + n * K * V + hoff, state, mask=hmask)
        rows = n * C + r
        kt = _tile(k_ptr, bh * T * K, rows, ck, T, K, K, 1)
        vt = _tile(v_ptr, bh * T * V, rows, cv, T, V, V, 1)
        gt = _tile(g_ptr, bh * s_gbh, rows, ck, T, K, s_gt, s_gk)
        g_last = _row(g_ptr, bh * s_gbh, tl.minimum(n * C + C, T) - 1, ck, T, K, s_gt, s_gk)
        ld = tl.load(ld_ptr + i_b * N * C + rows)
        keep = tl.load(keep_ptr + i_b * N + n)
        kd = kt * _exp_le0(g_last[None, :] - gt) * ld[:, None]
        state = state * (tl.exp(g_last) * keep)[:, None]
        state += tl.dot(tl.trans(kd).to(k_ptr.dtype.element_ty), vt.to(k_ptr.dtype.element_ty))
    tl.store(ht_ptr + bh * s_htbh + hoff, state, mask=hmask)


@triton.jit
def fwd_intra_kernel(
    q_ptr, k_ptr, g_ptr, seg_ptr, a_ptr, T, N, H, s_gbh, s_gt, s_gk,
    K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
):  # fmt: skip
    """A[t, s] = sum_k q_tk k_sk exp(G_tk - G_sk) for s <= t in one document; one BC-row block of a chunk."""
    i_ni, i_bh = tl.program_id(0), tl.program_id(1)
    i_n, i = i_ni // NC, i_ni % NC
    i_b = i_bh // H
    bh = i_bh.to(tl.int64)
    r = tl.arange(0, BC)
    t_rows = i_n * C + i * BC + r
    seg_t = tl.load(seg_ptr + i_b * T + t_rows, mask=t_rows < T, other=-1)
    ref = tl.minimum(i_n * C + i * BC, T - 1)  # reference row: first row of block i, after every earlier s
    for j in tl.static_range(NC):
        s_rows = i_n * C + j * BC + r
        seg_s = tl.load(seg_ptr + i_b * T + s_rows, mask=s_rows < T, other=-2)
        acc = tl.zeros([BC, BC], dtype=tl.float32)
        if j < i:
            for kk in range(0, K, BK):
                ck = kk + tl.arange(0, BK)
                g_ref = _row(g_ptr, bh * s_gbh, ref, ck, T, K, s_gt, s_gk)
                qg = _tile(q_ptr, bh * T * K, t_rows, ck, T, K, K, 1)
                qg *= _exp_le0(_tile(g_ptr, bh * s_gbh, t_rows, ck, T, K, s_gt, s_gk) - g_ref[None, :])
                kg = _tile(k_ptr, bh * T * K, s_rows, ck, T, K, K, 1)
                kg *= _exp_le0(g_ref[None, :] - _tile(g_ptr, bh * s_gbh, s_rows, ck, T, K, s_gt, s_gk))
                acc += tl.dot(qg.to(q_ptr.dtype.element_ty), tl.trans(kg).to(q_ptr.dtype.element_ty))
        elif j == i:  # diagonal block: one column at a time, elementwise in fp32
            for kk in range(0, K, BK):
                ck = kk + tl.arange(0, BK)
                qt = _tile(q_ptr, bh * T * K, t_rows, ck, T, K, K, 1)
                gt = _tile(g_ptr, bh * s_gbh, t_rows, ck, T, K, s_gt, s_gk)
                for c in range(BC):
                    s = i_n * C + i * BC + c
                    ks = _row(k_ptr, bh * T * K, s, ck, T, K, K, 1)
                    gs = _row(g_ptr, bh * s_gbh, s, ck, T, K, s_gt, s_gk)
                    col = tl.sum(qt * ks[None, :] * _exp_le0(gt - gs[None, :]), axis=1)
                    acc += tl.where((r[:, None] >= c) & (r[None, :] == c), col[:, None], 0.0)
        acc = tl.where(seg_t[:, None] == seg_s[None, :], acc, 0.0)  # other documents and rows past T
        tl.store(a_ptr + (bh * N + i_n) * C * C + (i * BC + r)[:, None] * C + j * BC + r[None, :], acc)


@triton.jit
def fwd_out_kernel(
    q_ptr, v_ptr, g_ptr, sp_ptr, h_ptr, a_ptr, o_ptr, T, N, H, s_gbh, s_gt, s_gk, s_hbh,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """o = (q exp(G) sp) h_n + A v for one chunk and one block of value columns."""
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // H
    bh = i_bh.to(tl.int64)
    rows = i_n * C + tl.arange(0, C)
    cv = i_v * BV + tl.arange(0, BV)
    sp = tl.load(sp_ptr + i_b * N * C + rows)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for kk in range(0, K, BK):
        ck = kk + tl.arange(0, BK)
        qd = _tile(q_ptr, bh * T * K, rows, ck, T, K, K, 1)
        qd *= _exp_le0(_tile(g_ptr, bh * s_gbh, rows, ck, T, K, s_gt, s_gk)) * sp[:, None]
        hb = _tile(h_ptr, bh * s_hbh + i_n * K * V, ck, cv, K, V, V, 1)
        acc += tl.dot(qd.to(q_ptr.dtype.element_ty), hb.to(q_ptr.dtype.element_ty))
    a = _tile(a_ptr, (bh * N + i_n) * C * C, tl.arange(0, C), tl.arange(0, C), C, C, C, 1)
    vt = _tile(v_ptr, bh * T * V, rows, cv, T, V, V, 1)
    acc += tl.dot(a.to(v_ptr.dtype.element_ty), vt.to(v_ptr.dtype.element_ty))
    mask = (rows < T)[:, None] & (cv < V)[None, :]
    tl.store(o_ptr + bh * T * V + rows[:, None] * V + cv[None, :], acc, mask=mask)


@triton.jit
def bwd_state_kernel(
    q_ptr, do_ptr, g_ptr, sp_ptr, keep_ptr, dht_ptr, dh_ptr, dh0_ptr, T, N, H, s_gbh, s_gt, s_gk,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
):  # fmt: skip
    """dh[n] = gradient of the state leaving chunk n, backwards from dht; dh0 = gradient of the initial state."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // H
    bh = i_bh.to(tl.int64)
    ck = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    r = tl.arange(0, C)
    hmask = (ck < K)[:, None] & (cv < V)[None, :]
    hoff = ck[:, None] * V + cv[None, :]
    if HAS_DHT:
        dstate = tl.load(dht_ptr + bh * K * V + hoff, mask=hmask, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(N):
        n = N - 1 - i
        tl.store(dh_ptr + (bh * N + n) * K * V + hoff, dstate, mask=hmask)
        rows = n * C + r
        qd = _tile(q_ptr, bh * T * K, rows, ck, T, K, K, 1)
        gt = _tile(g_ptr, bh * s_gbh, rows, ck, T, K, s_gt, s_gk)
        g_last = _row(g_ptr, bh * s_gbh, tl.minimum(n * C + C, T) - 1, ck, T, K, s_gt, s_gk)
        sp = tl.load(sp_ptr + i_b * N * C + rows)
        keep = tl.load(keep_ptr + i_b * N + n)
        qd *= _exp_le0(gt) * sp[:, None]
        dot_t = do_ptr.dtype.element_ty
        dstate = dstate * (tl.exp(g_last) * keep)[:, None]
        dstate += tl.dot(tl.trans(qd).to(dot_t), _tile(do_ptr, bh * T * V, rows, cv, T, V, V, 1).to(dot_t))
    tl.store(dh0_ptr + bh * K * V + hoff, dstate, mask=hmask)


@triton.jit
def bwd_dv_kernel(
    k_ptr, v_ptr, g_ptr, ld_ptr, seg_ptr, a_ptr, do_ptr, dh_ptr, da_ptr, dv_ptr, T, N, H, s_gbh, s_gt, s_gk,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """dv = A^T do + (k exp(G_L - G) ld) dh[n]; dA = do v^T on the visible (causal, same-document) pairs."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // H
    bh = i_bh.to(tl.int64)
    r = tl.arange(0, C)
    rows = i_n * C + r
    ld = tl.load(ld_ptr + i_b * N * C + rows)
    seg = tl.load(seg_ptr + i_b * T + rows, mask=rows < T, other=-1)
    last = tl.minimum(i_n * C + C, T) - 1
    a = _tile(a_ptr, (bh * N + i_n) * C * C, r, r, C, C, C, 1)
    dot_t = v_ptr.dtype.element_ty
    da = tl.zeros([C, C], dtype=tl.float32)
    for vv in range(0, V, BV):
        cv = vv + tl.arange(0, BV)
        dot_ = _tile(do_ptr, bh * T * V, rows, cv, T, V, V, 1).to(dot_t)
        da += tl.dot(dot_, tl.trans(_tile(v_ptr, bh * T * V, rows, cv, T, V, V, 1)).to(dot_t))
        dv = tl.dot(tl.trans(a).to(dot_t), dot_)
        for kk in range(0, K, BK):
            ck = kk + tl.arange(0, BK)
            g_last = _row(g_ptr, bh * s_gbh, last, ck, T, K, s_gt, s_gk)
            kd = _tile(k_ptr, bh * T * K, rows, ck, T, K, K, 1)
            kd *= _exp_le0(g_last[None, :] - _tile(g_ptr, bh * s_gbh, rows, ck, T, K, s_gt, s_gk)) * ld[:, None]
            dv += tl.dot(kd.to(dot_t), _tile(dh_ptr, (bh * N + i_n) * K * V, ck, cv, K, V, V, 1).to(dot_t))
        tl.store(
            dv_ptr + bh * T * V + rows[:, None] * V + cv[None, :], dv, mask=(rows < T)[:, None] & (cv < V)[None, :]
        )
    visible = (r[:, None] >= r[None, :]) & (seg[:, None] == seg[None, :])
    tl.store(da_ptr + (bh * N + i_n) * C * C + r[:, None] * C + r[None, :], tl.where(visible, da, 0.0))


@triton.jit
def bwd_inter_kernel(
    v_ptr, g_ptr, sp_ptr, ld_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, extra_ptr, T, N, H, s_gbh, s_gt, s_gk,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """State parts of dq, dk (fp32), and extra = rowsum(dh[n] * h_{n+1}), the gradient through exp(G_L)."""
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // H
    bh = i_bh.to(tl.int64)
    rows = i_n * C + tl.arange(0, C)
    ck = i_k * BK + tl.arange(0, BK)
    dot_t = v_ptr.dtype.element_ty
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    extra = tl.zeros([BK], dtype=tl.float32)
    h_base = bh * (N + 1) * K * V + i_n * K * V  # h holds N + 1 states here: the final one last
    for vv in range(0, V, BV):
        cv = vv + tl.arange(0, BV)
        hb = _tile(h_ptr, h_base, ck, cv, K, V, V, 1)
        dhb = _tile(dh_ptr, (bh * N + i_n) * K * V, ck, cv, K, V, V, 1)
        dq += tl.dot(_tile(do_ptr, bh * T * V, rows, cv, T, V, V, 1).to(dot_t), tl.trans(hb).to(dot_t))
        dk += tl.dot(_tile(v_ptr, bh * T * V, rows, cv, T, V, V, 1).to(dot_t), tl.trans(dhb).to(dot_t))
        extra += tl.sum(dhb * _tile(h_ptr, h_base + K * V, ck, cv, K, V, V, 1), axis=1)
    gt = _tile(g_ptr, bh * s_gbh, rows, ck, T, K, s_gt, s_gk)
    g_last = _row(g_ptr, bh * s_gbh, tl.minimum(i_n * C + C, T) - 1, ck, T, K, s_gt, s_gk)
    dq *= _exp_le0(gt) * tl.load(sp_ptr + i_b * N * C + rows)[:, None]
    dk *= _exp_le0(g_last[None, :] - gt) * tl.load(ld_ptr + i_b * N * C + rows)[:, None]
    mask = (rows < T)[:, None] & (ck < K)[None, :]
    off = bh * T * K + rows[:, None] * K + ck[None, :]
    tl.store(dq_ptr + off, dq, mask=mask)
    tl.store(dk_ptr + off, dk, mask=mask)
    tl.store(extra_ptr + (bh * N + i_n) * K + ck, extra, mask=ck < K)


@triton.jit
def bwd_intra_kernel(
    q_ptr, k_ptr, g_ptr, da_ptr, dq_ptr, dk_ptr, dq_out, dk_out, dg_ptr, T, N, s_gbh, s_gt, s_gk,
    K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
):  # fmt: skip
    """Adds the intra-chunk parts to dq, dk for one BC-row block; dG = q dq - k dk (d loss / d G)."""
    i_k, i_ni, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i = i_ni // NC, i_ni % NC
    bh = i_bh.to(tl.int64)
    r = tl.arange(0, BC)
    ck = i_k * BK + tl.arange(0, BK)
    rows = i_n * C + i * BC + r
    qb, kb = bh * T * K, bh * T * K
    gb = bh * s_gbh
    da_base = (bh * N + i_n) * C * C
    dot_t = q_ptr.dtype.element_ty
    gi = _tile(g_ptr, gb, rows, ck, T, K, s_gt, s_gk)
    dq = _tile(dq_ptr, qb, rows, ck, T, K, K, 1)
    dk = _tile(dk_ptr, kb, rows, ck, T, K, K, 1)
    g_first = _row(g_ptr, gb, tl.minimum(i_n * C + i * BC, T - 1), ck, T, K, s_gt, s_gk)
    g_lastb = _row(g_ptr, gb, tl.minimum(i_n * C + i * BC + BC - 1, T - 1), ck, T, K, s_gt, s_gk)
    dq_off = tl.zeros([BC, BK], dtype=tl.float32)
    dk_off = tl.zeros([BC, BK], dtype=tl.float32)
    for j in tl.static_range(NC):
        s_rows = i_n * C + j * BC + r
        if j < i:  # earlier block: reference row = first row of block i
            kg = _tile(k_ptr, kb, s_rows, ck, T, K, K, 1)
            kg *= _exp_le0(g_first[None, :] - _tile(g_ptr, gb, s_rows, ck, T, K, s_gt, s_gk))
            da = _tile(da_ptr, da_base, i * BC + r, j * BC + r, C, C, C, 1)
            dq_off += tl.dot(da.to(dot_t), kg.to(dot_t))
        elif j > i:  # later block: reference row = last row of block i
            qg = _tile(q_ptr, qb, s_rows, ck, T, K, K, 1)
            qg *= _exp_le0(_tile(g_ptr, gb, s_rows, ck, T, K, s_gt, s_gk) - g_lastb[None, :])
            da = _tile(da_ptr, da_base, j * BC + r, i * BC + r, C, C, C, 1)
            dk_off += tl.dot(tl.trans(da).to(dot_t), qg.to(dot_t))
    dq += dq_off * _exp_le0(gi - g_first[None, :])
    dk += dk_off * _exp_le0(g_lastb[None, :] - gi)
    for c in range(BC):  # diagonal block, elementwise; dA is already zero above the diagonal
        u = i_n * C + i * BC + c
        da_col = tl.load(da_ptr + da_base + (i * BC + r) * C + i * BC + c)
        da_row = tl.load(da_ptr + da_base + (i * BC + c) * C + i * BC + r)
        gu = _row(g_ptr, gb, u, ck, T, K, s_gt, s_gk)
        dq += da_col[:, None] * _row(k_ptr, kb, u, ck, T, K, K, 1)[None, :] * _exp_le0(gi - gu[None, :])
        dk += da_row[:, None] * _row(q_ptr, qb, u, ck, T, K, K, 1)[None, :] * _exp_le0(gu[None, :] - gi)
    mask = (rows < T)[:, None] & (ck < K)[None, :]
    off = bh * T * K + rows[:, None] * K + ck[None, :]
    dg = _tile(q_ptr, qb, rows, ck, T, K, K, 1) * dq - _tile(k_ptr, kb, rows, ck, T, K, K, 1) * dk
    tl.store(dq_out + off, dq, mask=mask)
    tl.store(dk_out + off, dk, mask=mask)
    tl.store(dg_ptr + off, dg, mask=mask)


# ---------------------------------------------------------------- host side: wrappers and autograd


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
    chunk_cumsum_kernel[(triton.cdiv(K, BK), N, B * H)](
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
    fwd_state_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
        k, v, G, ld, keep, h0 if h0 is not None else h, h, ht, T, N, H, *gs, slots * K * V,
        slots * K * V if with_final_slot else K * V, K, V, C, BK, BV, h0 is not None,
    )  # fmt: skip
    return h, ht


def _intra(q, k, G, gs, seg, C, cap: int) -> torch.Tensor:
    B, H, T, K = q.shape
    N, NC = triton.cdiv(T, C), C // SUB_CHUNK
    A = torch.empty(B, H, N, C, C, dtype=torch.float32, device=q.device)
    fwd_intra_kernel[(N * NC, B * H)](q, k, G, seg, A, T, N, H, *gs, K, C, SUB_CHUNK, _block(K, cap), NC)
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
        fwd_out_kernel[(triton.cdiv(V, BV), N, B * H)](q, v, G, sp, h, A, o, T, N, H, *gs, N * K * V, K, V, C, BK, BV)
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
        bwd_state_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
            q, do, G, sp, keep, dh if dht is None else dht.contiguous(), dh, dh0, T, N, H, *gs,
            K, V, C, BK, BV, dht is not None,
        )  # fmt: skip
        dA = torch.empty(B, H, N, C, C, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(v)
        bwd_dv_kernel[(N, B * H)](k, v, G, ld, seg, A, do, dh, dA, dv, T, N, H, *gs, K, V, C, BK, BV)
        dq_state = torch.empty(B, H, T, K, dtype=torch.float32, device=q.device)
        dk_state = torch.empty_like(dq_state)
        extra = torch.empty(B, H, N, K, dtype=torch.float32, device=q.device)
        bwd_inter_kernel[(triton.cdiv(K, BK), N, B * H)](
            v, G, sp, ld, h, dh, do, dq_state, dk_state, extra, T, N, H, *gs, K, V, C, BK, BV
        )
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dG = torch.empty_like(dq_state)
        bwd_intra_kernel[(triton.cdiv(K, BK), N * NC, B * H)](
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
