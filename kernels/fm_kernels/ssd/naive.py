"""Per-step reference of Mamba-2's SSD recurrence, in Mamba-2 notation (the ground truth for ssd_chunked).

    h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t x_t^T        h: (N, P) per (batch, head), fp32 (fp64 for fp64)
    y_t = C_t^T h_t + D x_t

Written without the gated-recurrence kernels on purpose, so that it checks them too.
"""

from __future__ import annotations

import torch


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (b, T, H, P); dt (b, T, H) > 0; A (H,) < 0; B, C (b, T, G, N); D (H,); doc_ids (b, T);
    initial_state (b, H, N, P). Returns y (b, T, H, P) in x's dtype and, if asked, the final state."""
    bsz, T, H, P = x.shape
    N = B.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_w, dt_w, A_w = x.to(work), dt.to(work), A.to(work)
    group_of_head = torch.arange(H, device=x.device) // (H // B.shape[2])  # heads share B/C in blocks
    B_h, C_h = B[:, :, group_of_head].to(work), C[:, :, group_of_head].to(work)
    h = x.new_zeros(bsz, H, N, P, dtype=work) if initial_state is None else initial_state.to(work)
    ys = []
    for t in range(T):
        if doc_ids is not None and t > 0:
            h = h * (doc_ids[:, t] == doc_ids[:, t - 1]).to(work)[:, None, None, None]
        decay = torch.exp(dt_w[:, t] * A_w)[..., None, None]
        h = decay * h + (dt_w[:, t, :, None] * B_h[:, t])[..., None] * x_w[:, t, :, None, :]
        y = torch.einsum("bhn,bhnp->bhp", C_h[:, t], h)
        if D is not None:
            y = y + D.to(work)[:, None] * x_w[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1).to(x.dtype), (h if output_final_state else None)
