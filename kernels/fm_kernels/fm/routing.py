"""FM routing (spec steps 1-4): the softmax router, its top-k, and per-row rates evaluated only at routed rows.

Two formulations of the same top-k routing, and two of a projection read at a few rows:

- `route(logits, top_k)`: the spec written literally and the reference. A softmax over all m rows, keep the
  top-k values, divide them by their sum, zero-fill the rest: the weights `a` are (..., m).
- `topk_route(logits, k, tau)`: the sparse layer's path. The top-k of the raw logits (the same rows: softmax
  and division by tau > 0 keep the order), then a softmax over the k kept logits / tau. That equals the
  renormalised top-k of the full softmax (exp(l_i) / Z divided by sum_kept exp(l_j) / Z: Z cancels), so the
  only (..., m) tensor it touches is the logits it is given; its outputs are (..., k).
- `linear_at_rows_reference(x, weight, index, bias)`: (x W^T + b) at the given rows, by forming the whole
  projection (..., R) and gathering: the reference.
- `linear_at_rows(x, weight, index, bias)`: the same values, computing only the c requested dot products per
  token from the gathered weight rows, in token blocks so that no (..., R) tensor exists (custom autograd).

Cost of the gathered projection against the full one, per token, with R = H m rows and c = H k wanted:
FLOPs 2 c d_in instead of 2 R d_in (k / m of them), forward and backward alike; memory: a block of gathered
weight rows (n, c, d_in) bounded by `max_block_elements`, instead of the (.., R) projection and its gradient.
The catch is arithmetic intensity: every gathered weight row serves one token (about 1 FLOP per weight element
read), where the full projection is a GEMM that reuses each weight tile across many tokens. On a GPU the
gather is therefore memory-bound and can be slower than the GEMM it replaces unless k / m is small (see
docs/fm_layer.md); its gains are the (T x m) memory and the FLOPs, not necessarily time.
"""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Router and rates run in fp32 (fp64 stays fp64, so references can be checked tightly)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def route(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The literal router (reference): softmax in fp32 over the last dim; keep the top-k, renormalise to sum 1.

    logits (..., m), already divided by tau. Returns (a, alpha, rows): a (..., m) the routing weights (zeros
    outside the kept rows; a = alpha for the dense variant), alpha (..., m) the full softmax, rows (..., k)
    int64 the kept indices in descending order of weight (None for the dense variant, `top_k` None or >= m).
    """
    alpha = torch.softmax(at_least_fp32(logits), dim=-1)
    m = alpha.shape[-1]
    if top_k is None or top_k >= m:
        return alpha, alpha, None
    vals, rows = alpha.topk(top_k, dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True)
    a = torch.zeros_like(alpha).scatter(-1, rows, vals)
    return a, alpha, rows


def topk_route(logits: torch.Tensor, k: int, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing without any (..., m) output: the same rows and weights as `route(logits / tau, k)`.

    logits (..., m) raw router logits (any float dtype); k in [1, m]; tau > 0 the temperature. Returns rows
    (..., k) int64 in descending order of logit and a (..., k) in fp32 (fp64 for fp64 logits): the softmax of
    the kept logits / tau, i.e. `route`'s renormalised top-k weights at `rows`. The kept logits are divided by
    tau in the logits' dtype, exactly as `route`'s caller divides all of them. Differentiable in the logits
    (their gradient is zero outside the kept rows, as through `route`).
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"topk_route: k={k} must lie in [1, {logits.shape[-1]}]")
    if not tau > 0:
        raise ValueError(f"topk_route: tau={tau} must be > 0")
    kept, rows = logits.topk(k, dim=-1)
    return rows, torch.softmax(at_least_fp32(kept / tau), dim=-1)


def linear_at_rows_reference(
    x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(x W^T + b) gathered at `index`: x (..., d_in), weight (R, d_in), index (..., c) int64 in [0, R),
    bias (R,) or None. Returns (..., c) in x's dtype. Forms the full (..., R) projection (the reference)."""
    full = torch.nn.functional.linear(x, weight)
    if bias is not None:
        full = full + bias
    return full.gather(-1, index)


def _blocks(n: int, block: int):
    for s in range(0, n, block):
        yield s, min(n, s + block)


class _LinearAtRows(torch.autograd.Function):
    """out[n, j] = x[n] . weight[index[n, j]] (+ bias[index[n, j]]) over token blocks; see linear_at_rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, block: int):
        N, c = index.shape
        out = x.new_empty(N, c)
        for s, e in _blocks(N, block):
            out[s:e] = torch.bmm(weight[index[s:e]], x[s:e, :, None]).squeeze(-1)  # (n, c, d) @ (n, d, 1)
        if bias is not None:
            out = out + bias[index]
        ctx.save_for_backward(x, weight, index)
        ctx.block, ctx.bias_dtype = block, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, index = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        N, d = index.shape[0], x.shape[-1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # weight/bias sums over tokens: fp32 (fp64)
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        if need_x or need_w:
            for s, e in _blocks(N, ctx.block):
                idx, g = index[s:e], grad[s:e]
                if need_x:
                    dx[s:e] = torch.bmm(g[:, None, :].to(x.dtype), weight[idx]).squeeze(1)  # (n, 1, c) @ (n, c, d)
                if need_w:
                    outer = g.to(acc)[:, :, None] * x[s:e].to(acc)[:, None, :]  # (n, c, d)
                    dw.index_add_(0, idx.reshape(-1), outer.reshape(-1, d))
        db = None
        if need_b:
            db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
            db = db.index_add_(0, index.reshape(-1), grad.reshape(-1).to(acc)).to(ctx.bias_dtype)
        return dx, (dw.to(weight.dtype) if need_w else None), db, None, None


def linear_at_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_block_elements: int = 1 << 26,
) -> torch.Tensor:
    """Rows `index` of the projection x W^T + b without forming it: same contract as `linear_at_rows_reference`.

    x (..., d_in); weight (R, d_in) in x's dtype; index (..., c) int64 in [0, R), same leading dims as x;
    bias (R,) or None. Returns (..., c) in x's dtype, differentiable in x, weight and bias (the weight and
    bias gradients are accumulated in fp32, fp64 for fp64). Tokens go in blocks of n with n c d_in <=
    max_block_elements (at least one token), so the transient gathered weights (n, c, d_in) stay bounded; the
    backward gathers them again instead of keeping them.
    """
    if index.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"linear_at_rows: index {tuple(index.shape)} and x {tuple(x.shape)} differ in leading dims")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_at_rows: weight must be (R, {x.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_at_rows: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    d, c = x.shape[-1], index.shape[-1]
    block = max(1, max_block_elements // max(1, c * d))
    out = _LinearAtRows.apply(x.reshape(-1, d), weight, bias, index.reshape(-1, c), block)
    return out.view(*index.shape)
