"""Backend choice for the gated recurrence (FM and Mamba-2): the PyTorch chunked path or the Triton kernels.

`resolve_backend(requested, device)`: `auto` takes Triton on CUDA (when triton imports), PyTorch elsewhere;
`torch` and `triton` force one. The environment variable FM_PRETRAIN_KERNELS=torch|triton overrides the
request everywhere (config included), e.g. to benchmark or debug without editing configs.
Triton runs on CUDA tensors, and on CPU tensors only in its interpreter (TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from .chunk import chunk_gated_recurrence

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FM_PRETRAIN_KERNELS"
_logged_override: set[tuple[str, str]] = set()  # (value, what) already logged


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether the Triton kernels can run here: triton imports and there is a CUDA GPU or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def triton_runs_on(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))


def env_override(requested: str, what: str = "kernel backend") -> str | None:
    """FM_PRETRAIN_KERNELS=torch|triton, or None where it is unset; logged once per value (every op family that
    chooses a backend reads it here: the gated kernels, FM's, the gated delta rule's)."""
    override = os.environ.get(ENV_VAR, "").strip()
    if not override:
        return None
    if override not in ("torch", "triton"):
        raise ValueError(f"environment variable {ENV_VAR}={override!r}: expected 'torch' or 'triton'")
    if (override, what) not in _logged_override:
        _logged_override.add((override, what))
        log.info("%s=%s overrides the configured %s (%s)", ENV_VAR, override, what, requested)
    return override


def resolve_backend(requested: str, device: torch.device) -> str:
    """`auto` -> `triton` on CUDA when available, else `torch`; FM_PRETRAIN_KERNELS overrides `requested`."""
    requested = env_override(requested) or requested
    if requested not in BACKENDS:
        raise ValueError(f"unknown FM backend '{requested}' (choose from {BACKENDS})")
    if requested == "triton":
        if not triton_runs_on(device):
            raise RuntimeError(
                f"kernel backend 'triton' cannot run on {device}: it needs a CUDA device with triton installed, "
                "or TRITON_INTERPRET=1 for CPU tensors; use backend 'torch' or 'auto'"
            )
        return "triton"
    if requested == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def gated_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked gated recurrence on the given backend (`auto` is resolved on q's device)."""
    if backend == "auto":
        backend = resolve_backend(backend, q.device)
    if backend == "torch":
        return chunk_gated_recurrence(
            q=q, k=k, v=v, g=g, doc_ids=doc_ids, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip
    if backend != "triton":
        raise ValueError(f"unknown kernel backend '{backend}' (choose from {BACKENDS})")
    if not triton_runs_on(q.device):
        raise RuntimeError(f"kernel backend 'triton' cannot run on {q.device} (CUDA, or CPU with TRITON_INTERPRET=1)")
    from .chunk_triton import triton_gated_recurrence  # imported late: triton.jit reads TRITON_INTERPRET

    return triton_gated_recurrence(
        q=q, k=k, v=v, g=g, doc_ids=doc_ids, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )  # fmt: skip
