"""Single-token FM updates for decoding, with the state (B, H, m, d_mem) kept by the caller.

The sparse step touches only the k selected rows: it gathers them, updates them and scatters them back,
so its cost is O(k d_mem) per head, independent of m.
"""

from __future__ import annotations

import torch


def fm_step(
    state: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor, xbar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense step. state (B, H, m, d); theta, phi (B, H, m); xbar (B, H, d). Returns (r, new_state)."""
    dt = state.dtype
    w = theta.to(dt).unsqueeze(-1)
    new_state = (1 - w) * state + w * xbar.to(dt).unsqueeze(-2)
    r = torch.einsum("bhm,bhmd->bhd", phi.to(dt), new_state)
    return r.to(xbar.dtype), new_state


def fm_step_sparse(
    state: torch.Tensor,
    rows: torch.Tensor,
    theta_k: torch.Tensor,
    phi_k: torch.Tensor,
    xbar: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse step on k rows. rows (B, H, k) long; theta_k, phi_k (B, H, k); xbar (B, H, d).

    Updates `state` in place (only the k rows are written) and returns (r, state).
    backend: `auto` runs the Triton step kernel (`step_triton.py`) on CUDA tensors and this gather/scatter
    elsewhere; `triton` forces the kernel (CPU tensors need TRITON_INTERPRET=1); `torch` forces this code.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"fm_step_sparse: unknown backend '{backend}' (choose from auto, torch, triton)")
    if backend == "triton" or (backend == "auto" and state.is_cuda):
        from .step_triton import fm_step_sparse_triton  # imports triton only when used

        return fm_step_sparse_triton(state=state, rows=rows, theta_k=theta_k, phi_k=phi_k, xbar=xbar)
    dt = state.dtype
    B, H, m, d = state.shape
    rows_at_once = state.is_contiguous()
    if rows_at_once:
        # Whole rows of the (B H m, d) view: index_select / index_copy_ move k contiguous rows per head, where
        # gather / scatter_ with an index expanded over d go element by element (the step took twice as long at
        # batch 16 on CPU, H = 4, m = 64, k = 16, d = 64). The same values: both only copy.
        flat = state.view(B * H * m, d)
        index = (rows + torch.arange(0, B * H * m, m, device=rows.device).view(B, H, 1)).reshape(-1)
        sel = flat.index_select(0, index).view(*rows.shape, d)  # (B, H, k, d)
    else:
        idx = rows.unsqueeze(-1).expand(*rows.shape, d)
        sel = state.gather(2, idx)
    w = theta_k.to(dt).unsqueeze(-1)
    sel = (1 - w) * sel + w * xbar.to(dt).unsqueeze(-2)
    if rows_at_once:
        flat.index_copy_(0, index, sel.reshape(-1, d))
    else:
        state.scatter_(2, idx, sel)
    r = (phi_k.to(dt).unsqueeze(-2) @ sel).squeeze(-2)  # (B, H, 1, k) @ (B, H, k, d): the bmm einsum would call
    return r.to(xbar.dtype), state
