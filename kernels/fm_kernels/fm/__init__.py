"""Factorization Memory ops. `fm_recurrence` is the one entry point the model calls (the kernel seam)."""

from __future__ import annotations

import logging

import torch

from .chunk import chunk_fm, fm_log_decay
from .naive import naive_fm
from .step import fm_step, fm_step_sparse

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether Triton FM kernels are built in; none are yet (the chunked PyTorch path serves every device)."""
    return False


def resolve_backend(requested: str, device: torch.device) -> str:
    """Pick the implementation: `auto` takes Triton on CUDA when its kernels exist, else PyTorch."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown FM backend '{requested}' (choose from {BACKENDS})")
    if requested == "triton":
        if not triton_available():
            raise NotImplementedError(
                "FM backend 'triton' was requested, but the Triton FM kernels are not part of this build yet; "
                "use backend 'torch' or 'auto'"
            )
        return "triton"
    if requested == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


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
    """FM read-out r (B, H, T, d_mem) for write weights theta, read weights phi (B, H, T, m) and values xbar."""
    if backend != "torch":
        raise NotImplementedError(f"FM backend '{backend}' is not available in this build")
    return chunk_fm(theta, phi, xbar, doc_ids, initial_state, output_final_state, chunk_size)


__all__ = [
    "BACKENDS",
    "chunk_fm",
    "fm_log_decay",
    "fm_recurrence",
    "fm_step",
    "fm_step_sparse",
    "naive_fm",
    "resolve_backend",
    "triton_available",
]
