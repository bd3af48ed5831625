"""Factorization Memory recurrence written exactly as docs/fm_spec.md states it (the ground truth).

Per (batch, head): H_t[i] = (1 - theta_t[i]) H_{t-1}[i] + theta_t[i] xbar_t, r_t = sum_i phi_t[i] H_t[i].
H_0 = 0 (or initial_state) and H is reset to 0 at the first token of every document.
"""

from __future__ import annotations

import torch

from ..gated.naive import state_dtype


def naive_fm(
    theta: torch.Tensor,
    phi: torch.Tensor,
    xbar: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """theta, phi (B, H, T, m) write/read weights; xbar (B, H, T, d_mem); doc_ids (B, T).

    Returns r (B, H, T, d_mem) and optionally the final state (B, H, m, d_mem).
    """
    B, H, T, m = theta.shape
    d_mem = xbar.shape[-1]
    dt = state_dtype(theta)
    mem = theta.new_zeros(B, H, m, d_mem, dtype=dt) if initial_state is None else initial_state.to(dt)
    reads = []
    for t in range(T):
        if doc_ids is not None and t > 0:
            mem = mem * (doc_ids[:, t] == doc_ids[:, t - 1]).to(dt)[:, None, None, None]
        w = theta[:, :, t].to(dt).unsqueeze(-1)  # (B, H, m, 1)
        mem = (1 - w) * mem + w * xbar[:, :, t].to(dt).unsqueeze(-2)
        reads.append(torch.einsum("bhm,bhmd->bhd", phi[:, :, t].to(dt), mem))
    r = torch.stack(reads, dim=2).to(xbar.dtype)
    return r, (mem if output_final_state else None)
