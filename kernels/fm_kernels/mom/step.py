"""One decoding token of Mixture-of-Memories: only the k routed memories are loaded, updated and read."""

from __future__ import annotations

import torch

from ..gated.naive import gated_recurrence_step
from ..gated_delta.naive import gated_delta_step


def mom_step(
    state: torch.Tensor,
    memories: torch.Tensor,
    weights: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """state (B, M, H, K, V) fp32, updated in place at the routed memories only; memories (B, k) int64 distinct per
    row; weights (B, k); q (B, H, K) shared by the memories; k (B, k, H, K), v (B, k, H, V), g (B, k, H, K) or
    (B, k, H) and beta (B, k, H) or None: the routed memories' inputs. Returns o (B, H, V) in q's dtype: the
    weighted sum of the k reads, in slot order."""
    B, kk = memories.shape
    H = q.shape[1]
    rows = torch.arange(B, device=state.device)[:, None].expand(B, kk)
    sel = state[rows, memories]  # (B, k, H, K, V): a copy of the k routed memories only
    flat = lambda x: x.reshape(B * kk, *x.shape[2:])  # noqa: E731
    q_rep = q[:, None].expand(B, kk, *q.shape[1:])
    if beta is None:
        o, new = gated_recurrence_step(flat(sel), flat(q_rep), flat(k), flat(v), flat(g))
    else:
        o, new = gated_delta_step(flat(sel), flat(q_rep), flat(k), flat(v), flat(g), flat(beta))
    state[rows, memories] = new.view_as(sel)
    work = new.dtype
    o = (o.to(work).view(B, kk, H, -1) * weights.to(work)[:, :, None, None]).sum(1)
    return o.to(q.dtype)
