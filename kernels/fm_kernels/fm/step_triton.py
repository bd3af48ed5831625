"""Triton decode step for sparse FM (the kernel behind `step.fm_step_sparse`, whose PyTorch code is its reference).

Per (batch, head), one program loads, updates and reads only the k selected rows.

The state (B, H, m, d_mem) stays where it is (GPU memory during generation) and is updated in place; rows that
were not selected are neither read nor written, so a step costs O(k d_mem) per head whatever m is. Arithmetic
is fp32 (fp64 for an fp64 state); values are upcast right after loading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fm_decode_sparse_kernel(S, ROWS, THETA, PHI, X, R, M, K, D, BK: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < D
    kk = tl.arange(0, BK)
    kmask = kk < K
    rows = tl.load(ROWS + bh * K + kk, mask=kmask, other=0).to(tl.int64)
    th = tl.load(THETA + bh * K + kk, mask=kmask, other=0).to(ACC)
    ph = tl.load(PHI + bh * K + kk, mask=kmask, other=0).to(ACC)
    x = tl.load(X + bh * D + cols, mask=cmask, other=0).to(ACC)
    ptr = S + (bh * M + rows)[:, None] * D + cols[None, :]
    m2 = kmask[:, None] & cmask[None, :]
    sel = tl.load(ptr, mask=m2, other=0).to(ACC)
    sel = (1.0 - th[:, None]) * sel + th[:, None] * x[None, :]
    tl.store(ptr, sel.to(S.dtype.element_ty), mask=m2)
    r = tl.sum(ph[:, None] * sel, axis=0)
    tl.store(R + bh * D + cols, r.to(R.dtype.element_ty), mask=cmask)


def fm_step_sparse_triton(
    state: torch.Tensor, rows: torch.Tensor, theta_k: torch.Tensor, phi_k: torch.Tensor, xbar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `step.fm_step_sparse` (state updated in place, only its k rows touched)."""
    B, H, m, d = state.shape
    k = rows.shape[-1]
    if rows.shape != (B, H, k) or theta_k.shape != rows.shape or phi_k.shape != rows.shape:
        raise ValueError(
            f"fm decode: rows, theta_k, phi_k must be (B, H, k) = {(B, H, k)}; got "
            f"{tuple(rows.shape)}, {tuple(theta_k.shape)}, {tuple(phi_k.shape)}"
        )
    if xbar.shape != (B, H, d):
        raise ValueError(f"fm decode: xbar must be {(B, H, d)}, got {tuple(xbar.shape)}")
    work = state if state.is_contiguous() else state.contiguous()  # the kernel indexes a dense layout
    r = xbar.new_empty(B, H, d)
    acc = tl.float64 if state.dtype == torch.float64 else tl.float32
    bd = min(128, triton.next_power_of_2(d))
    _fm_decode_sparse_kernel[(B * H, triton.cdiv(d, bd))](
        work, rows.contiguous(), theta_k.contiguous(), phi_k.contiguous(), xbar.contiguous(), r, m, k, d,
        BK=triton.next_power_of_2(k), BD=bd, ACC=acc,
    )  # fmt: skip
    if work is not state:
        state.copy_(work)
    return r, state
