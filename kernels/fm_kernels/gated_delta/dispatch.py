"""Backend choice for the gated delta rule (Gated DeltaNet, MoM's gated-delta shared memory).

`resolve_delta_backend(requested, device)`: `torch` is our chunked PyTorch path (`chunk.py`, every device);
`fla` is flash-linear-attention's Triton kernel through `fla.py` (CUDA only, optional dependency); `auto` takes
`fla` on CUDA when fla imports, else `torch`. The environment variable FM_PRETRAIN_KERNELS (as for the gated
kernels, `fm_kernels.gated.dispatch`) overrides the request: `torch` forces ours, `triton` forces fla (the
Triton path of this op). Decoding always takes our per-step `gated_delta_step`.
"""

from __future__ import annotations

import torch

from ..gated.dispatch import env_override
from .chunk import chunk_gated_delta
from .fla import INSTALL_HINT, fla_available, fla_chunk_gated_delta

DELTA_BACKENDS = ("auto", "torch", "fla")


def resolve_delta_backend(requested: str, device: torch.device) -> str:
    """`auto` -> `fla` on CUDA when fla imports, else `torch`; FM_PRETRAIN_KERNELS=torch|triton overrides."""
    override = env_override(requested, "gated delta backend")
    if override:
        requested = "torch" if override == "torch" else "fla"
    if requested not in DELTA_BACKENDS:
        raise ValueError(f"unknown gated delta backend '{requested}' (choose from {DELTA_BACKENDS})")
    if requested == "fla":
        if device.type != "cuda":
            raise RuntimeError(
                f"gated delta backend 'fla' cannot run on {device}: flash-linear-attention's kernels need a CUDA "
                "device; use backend 'torch' or 'auto'"
            )
        if not fla_available():
            raise RuntimeError(f"gated delta backend 'fla' needs flash-linear-attention: {INSTALL_HINT}")
        return "fla"
    if requested == "auto" and device.type == "cuda" and fla_available():
        return "fla"
    return "torch"


def gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked gated delta rule on the given backend (`auto` is resolved on q's device); contract of
    `chunk_gated_delta`."""
    if backend == "auto":
        backend = resolve_delta_backend(backend, q.device)
    if backend not in ("torch", "fla"):
        raise ValueError(f"unknown gated delta backend '{backend}' (choose from {DELTA_BACKENDS})")
    fn = chunk_gated_delta if backend == "torch" else fla_chunk_gated_delta
    return fn(
        q=q, k=k, v=v, g=g, beta=beta, doc_ids=doc_ids, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )  # fmt: skip
