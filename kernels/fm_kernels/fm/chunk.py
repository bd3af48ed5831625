"""Chunked FM in PyTorch: FM is the gated recurrence with k = theta, v = xbar, q = phi, g = log(1 - theta).

Dense and sparse routing go through the same path here (a sparse theta simply has zeros: decay 1, no
input); the m-independent sparse training kernel is a Triton kernel of its own.
"""

from __future__ import annotations

import torch

from ..gated.chunk import chunk_gated_recurrence


def fm_log_decay(theta: torch.Tensor) -> torch.Tensor:
    """log(1 - theta), guarded as theta -> 1 so that log and its gradient stay finite."""
    eps = 1e-12 if theta.dtype == torch.float64 else 1e-6
    return torch.log1p(-theta.clamp(max=1.0 - eps))


def chunk_fm(
    theta: torch.Tensor,
    phi: torch.Tensor,
    xbar: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as naive.naive_fm."""
    r, final = chunk_gated_recurrence(
        q=phi,
        k=theta,
        v=xbar,
        g=fm_log_decay(theta),
        doc_ids=doc_ids,
        initial_state=initial_state,
        output_final_state=output_final_state,
        chunk_size=chunk_size,
    )
    return r.to(xbar.dtype), final
