"""Reads of cached states, O(J) states per token, with memory bounded by token blocks (a custom autograd op).

    out[n, h] = sum_j w[n, h, j] * states[index[n, h, j], h]^T q[n, h]

Each (token, head) reads J states of a table; a weight of 0 or an index of -1 skips nothing but contributes 0.
Sparse FM's reads touch only the token's k rows of each state: with rows (N, H, k), q holds the read weights at
those rows and the read is sum_i q[n, h, i] states[s, h, rows[n, h, i]].

The forward gathers the J states of a block of tokens, reads them and forgets them; the backward gathers them
again and accumulates the states' gradient with index_add_ (so nothing of size N J K V is kept between passes).
"""

from __future__ import annotations

import torch


def _blocks(n: int, block: int):
    for s in range(0, n, block):
        yield s, min(n, s + block)


def _gather(states, index, rows):
    """states (S, H, K, V), index (n, H, J) -> (n, H, J, K, V); with rows (n, H, k): (n, H, J, k, V)."""
    n, H, J = index.shape
    heads = torch.arange(H, device=states.device)[None, :, None]
    safe = index.clamp(min=0)
    if rows is None:
        return states[safe, heads]
    return states[safe[..., None], heads[..., None], rows[:, :, None, :]]


class _StateReads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, states, weight, index, rows, block):
        N, H, _ = q.shape
        w = weight * (index >= 0).to(weight.dtype)
        out = q.new_zeros(N, H, states.shape[-1])
        for s, e in _blocks(N, block):
            sel = _gather(states, index[s:e], None if rows is None else rows[s:e])  # (n, H, J, K|k, V)
            out[s:e] = torch.einsum("nhk,nhjkv,nhj->nhv", q[s:e], sel, w[s:e])
        ctx.save_for_backward(q, states, w, index, rows)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad):
        q, states, w, index, rows = ctx.saved_tensors
        N, H, J = index.shape
        dq = torch.empty_like(q)
        dw = torch.empty_like(w)
        dstates = torch.zeros_like(states)
        S, _, K, V = states.shape
        heads = torch.arange(H, device=q.device)[None, :, None]
        for s, e in _blocks(N, ctx.block):
            r = None if rows is None else rows[s:e]
            sel = _gather(states, index[s:e], r)
            g = grad[s:e]
            dq[s:e] = torch.einsum("nhv,nhjkv,nhj->nhk", g, sel, w[s:e])
            dw[s:e] = torch.einsum("nhk,nhjkv,nhv->nhj", q[s:e], sel, g)
            outer = torch.einsum("nhj,nhk,nhv->nhjkv", w[s:e], q[s:e], g)
            slot = index[s:e].clamp(min=0) * H + heads  # (n, H, J): row of the (S * H, K, V) table
            if r is None:
                dstates.view(S * H, K, V).index_add_(0, slot.reshape(-1), outer.reshape(-1, K, V))
            else:  # only the k rows each read touched: rows of the (S * H * K, V) table
                cell = slot[..., None] * K + r[:, :, None, :]
                dstates.view(S * H * K, V).index_add_(0, cell.reshape(-1), outer.reshape(-1, V))
        dw = dw * (index >= 0).to(dw.dtype)
        return dq, dstates, dw, None, None, None


def state_reads(
    q: torch.Tensor,
    states: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    rows: torch.Tensor | None = None,
    max_block_elements: int = 1 << 24,
) -> torch.Tensor:
    """q (N, H, K) (or (N, H, k) read weights at rows (N, H, k)); states (S, H, K, V); weight (N, H, J); index (N, H, J)
    int64 in [-1, S). Returns (N, H, V) in q's dtype, differentiable in q, states and weight. Tokens go in blocks
    whose gathered states hold at most max_block_elements elements."""
    N, H, J = index.shape
    per_token = H * J * (q.shape[-1]) * states.shape[-1]
    block = max(1, max_block_elements // max(1, per_token))
    return _StateReads.apply(q, states, weight.to(q.dtype), index, rows, block)


def state_reads_reference(q, states, weight, index, rows=None):
    """The same sum written with one gather of every (token, head, slot) state (for tests)."""
    sel = _gather(states, index, rows)
    return torch.einsum("nhk,nhjkv,nhj->nhv", q, sel, weight.to(q.dtype) * (index >= 0).to(q.dtype))
