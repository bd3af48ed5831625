"""Factorization Memory ops. `fm_recurrence` is the one entry point the model calls (the kernel seam)."""

from __future__ import annotations

import torch

# The backend choice is shared with Mamba-2: auto = Triton on CUDA, PyTorch elsewhere.
from ..gated.dispatch import BACKENDS, gated_recurrence, resolve_backend, triton_available
from .chunk import chunk_fm, fm_log_decay
from .naive import naive_fm
from .sparse import dense_from_sparse, sparse_fm_reference
from .step import fm_step, fm_step_sparse


def fm_recurrence(
    theta: torch.Tensor,
    phi: torch.Tensor,
    xbar: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FM read-out r (B, H, T, d_mem) for write weights theta, read weights phi (B, H, T, m) and values xbar.

    backend: `torch` (chunked PyTorch), `triton` (the Triton chunked kernels) or `auto` (resolved on xbar's device).
    """
    if backend == "auto":
        backend = resolve_backend(backend, xbar.device)
    if backend == "torch":
        return chunk_fm(theta, phi, xbar, doc_ids, initial_state, output_final_state, chunk_size)
    r, final = gated_recurrence(
        phi, theta, xbar, fm_log_decay(theta), doc_ids, initial_state, output_final_state, chunk_size, backend
    )
    return r.to(xbar.dtype), final


# --- sparse FM (top-k routing given as rows; sparse.py, sparse_triton.py) ---
def fm_recurrence_sparse(
    rows: torch.Tensor,
    theta_k: torch.Tensor,
    phi_k: torch.Tensor,
    xbar: torch.Tensor,
    n_memories: int,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FM with k routed rows per token: rows, theta_k, phi_k (B, H, T, k), xbar (B, H, T, d_mem).

    `triton`: the segmented-scan kernels, O(T k d_mem) work whatever m; `torch`: the chunked dense path on the
    zero-filled (B, H, T, m) weights (O(T m d_mem)); `auto` is resolved on xbar's device.
    """
    if backend == "auto":
        backend = resolve_backend(backend, xbar.device)
    if backend == "torch":
        theta, phi = dense_from_sparse(rows, theta_k, n_memories), dense_from_sparse(rows, phi_k, n_memories)
        return chunk_fm(theta, phi, xbar, doc_ids, initial_state, output_final_state, chunk_size)
    from .sparse_triton import sparse_fm_triton  # imports triton only when used

    return sparse_fm_triton(rows, theta_k, phi_k, xbar, n_memories, doc_ids, initial_state, output_final_state)


__all__ = [
    "BACKENDS",
    "chunk_fm",
    "fm_log_decay",
    "fm_recurrence",
    "fm_recurrence_sparse",
    "fm_step",
    "fm_step_sparse",
    "naive_fm",
    "sparse_fm_reference",
    "resolve_backend",
    "triton_available",
]
