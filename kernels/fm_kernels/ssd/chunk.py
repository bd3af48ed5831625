"""Mamba-2 SSD through the shared gated-recurrence kernels (one kernel family serves FM and Mamba-2).

SSD is the gated linear recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t with
q = C, k = dt * B, v = x and one scalar log-decay per head g = dt * A; the state S = h is (N, P).
"""

from __future__ import annotations

import torch

from fm_kernels.gated import gated_recurrence, gated_recurrence_step


def expand_groups(u: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, G, N) -> (B, T, H, N): head h reads group h // (H / G), as in Mamba-2."""
    G = u.shape[2]
    if n_heads % G:
        raise ValueError(f"n_groups={G} must divide n_heads={n_heads}")
    return u if G == n_heads else u.repeat_interleave(n_heads // G, dim=2)


def ssd_inputs(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSD as the gated recurrence, head-major: x (b, T, H, P), dt (b, T, H), A (H,), B, C (b, T, G, N) ->
    q = C (b, H, T, N), k = dt B (b, H, T, N), v = x (b, H, T, P), g = dt A (b, H, T) (one log-decay per head)."""
    H = x.shape[2]
    q = expand_groups(C, H).transpose(1, 2)
    k = (dt[..., None] * expand_groups(B, H)).transpose(1, 2)
    g = (dt * A).transpose(1, 2)  # A < 0 and dt > 0, so every log-decay is <= 0
    return q, k, x.transpose(1, 2), g


def add_skip(o: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """y = o + D x, summed in fp32 (fp64 for fp64) and returned in x's dtype; D (H,) over (..., H, P)."""
    if D is not None:
        work = torch.promote_types(o.dtype, torch.float32)
        o = o.to(work) + D.to(work)[:, None] * x.to(work)
    return o.to(x.dtype)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as naive.ssd_naive: x (b, T, H, P); dt (b, T, H); A (H,); B, C (b, T, G, N); D (H,);
    initial_state (b, H, N, P), applied to the first document. Returns (y in x's dtype, final state).
    backend: `torch`, `triton` (scalar-decay Triton kernels) or `auto` (see fm_kernels.gated.dispatch)."""
    q, k, v, g = ssd_inputs(x, dt, A, B, C)
    o, final = gated_recurrence(
        q=q, k=k, v=v, g=g, doc_ids=doc_ids, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    return add_skip(o.transpose(1, 2), x, D), final


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding token: state (b, H, N, P) fp32; x (b, H, P); dt (b, H); B, C (b, G, N).
    Returns (y (b, H, P) in x's dtype, new state)."""
    H = x.shape[1]
    q = expand_groups(C[:, None], H)[:, 0]
    k = dt[..., None] * expand_groups(B[:, None], H)[:, 0]
    o, state = gated_recurrence_step(state=state, q=q, k=k, v=x, g=dt * A)
    return add_skip(o, x, D), state
