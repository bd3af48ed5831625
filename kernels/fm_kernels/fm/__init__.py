"""Factorization Memory ops. The model calls `fm_recurrence` (dense), `fm_recurrence_sparse` (top-k rows),
the decode steps `fm_step` / `fm_step_sparse` (the kernel seam), and the routing helpers of `routing.py`.

Files follow one rule: `{algorithm}.py` is PyTorch, `{algorithm}_triton.py` its Triton kernels (`sparse`,
`step`); `naive.py` is the spec written literally, the ground truth of both."""

from __future__ import annotations

import torch

# The backend choice is shared with Mamba-2: auto = Triton on CUDA, PyTorch elsewhere.
from ..gated.dispatch import BACKENDS, gated_recurrence, resolve_backend, triton_available
from .chunk import chunk_fm, fm_log_decay
from .naive import naive_fm
from .routing import linear_at_rows, route, topk_route
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
    """FM read-out for write weights theta, read weights phi (B, H, T, m) and values xbar (B, H, T, d_mem).

    doc_ids (B, T); initial_state (B, H, m, d_mem). Returns r (B, H, T, d_mem) in xbar's dtype and, if asked,
    the final state (B, H, m, d_mem) in fp32 (fp64 for fp64). backend: `torch` (chunked PyTorch), `triton`
    (the Triton chunked kernels) or `auto` (resolved on xbar's device).
    """
    if backend == "auto":
        backend = resolve_backend(backend, xbar.device)
    if backend == "torch":
        return chunk_fm(
            theta=theta, phi=phi, xbar=xbar, doc_ids=doc_ids, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip
    r, final = gated_recurrence(
        q=phi, k=theta, v=xbar, g=fm_log_decay(theta), doc_ids=doc_ids, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
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
    """FM with k routed rows per token: rows (B, H, T, k) int64, distinct per token, in [0, n_memories);
    theta_k, phi_k (B, H, T, k) their write/read weights; xbar (B, H, T, d_mem); doc_ids (B, T);
    initial_state (B, H, m, d_mem). Returns r (B, H, T, d_mem) in xbar's dtype and, if asked, the final state
    (B, H, m, d_mem) in fp32 (fp64 for fp64).

    `triton`: the segmented-scan kernels, O(T k d_mem) work whatever m; nothing of size T x m is formed.
    `torch`: the zero-filled (B, H, T, m) weights through the chunked dense path (O(T m d_mem)): the only place
    the sparse variant forms them. `auto` is resolved on xbar's device.
    """
    if backend == "auto":
        backend = resolve_backend(backend, xbar.device)
    if backend == "torch":
        theta, phi = dense_from_sparse(rows, theta_k, n_memories), dense_from_sparse(rows, phi_k, n_memories)
        return chunk_fm(
            theta=theta, phi=phi, xbar=xbar, doc_ids=doc_ids, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip
    from .sparse_triton import sparse_fm_triton  # imports triton only when used

    return sparse_fm_triton(
        rows=rows, theta_k=theta_k, phi_k=phi_k, xbar=xbar, n_memories=n_memories, doc_ids=doc_ids,
        initial_state=initial_state, output_final_state=output_final_state,
    )  # fmt: skip


__all__ = [
    "BACKENDS",
    "chunk_fm",
    "fm_log_decay",
    "fm_recurrence",
    "fm_recurrence_sparse",
    "fm_step",
    "fm_step_sparse",
    "linear_at_rows",
    "naive_fm",
    "route",
    "sparse_fm_reference",
    "resolve_backend",
    "topk_route",
    "triton_available",
]
