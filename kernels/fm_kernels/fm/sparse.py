"""Sparse FM in its own terms: the T*k routed (token, row) pairs, grouped by row, one gated scan per row.

FM with top-k routing writes and reads k rows per token. Grouping the pairs by row (as MoE layers group
tokens by expert) turns the (m x d_mem) state recurrence into m independent scalar-gated scans, each over
only the tokens routed to that row:

    h <- keep * (1 - theta) * h + theta * xbar,   y_pair = phi * h,   r_t = sum of y over t's k pairs

where keep = 0 when a document started since the row's previous pair (the row's state was reset). A row
starts from its initial state only while still in the first document. Nothing here is of size m * d_mem
per token: the work is O(T k d_mem), independent of m.

This module holds the pair bookkeeping shared by every implementation and the PyTorch reference of the
sparse formulation; the Triton kernels are in `sparse_triton.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..gated.naive import document_index, state_dtype


class RoutedPairs(NamedTuple):
    """Pairs of one (batch, head) sorted by (row, time): per head `P = T * k` entries."""

    perm: torch.Tensor  # (B*H, P) int32: pair index t * k + j of each sorted entry
    offsets: torch.Tensor  # (B*H, m + 1) int32: row i's segment is perm[offsets[i]:offsets[i + 1]]
    seg: torch.Tensor  # (B, T) int32: document index of each token (0 for the first document)


def sort_pairs(rows: torch.Tensor, n_memories: int, doc_ids: torch.Tensor | None) -> RoutedPairs:
    """Group the pairs of rows (B, H, T, k) by row, in time order within each row (one argsort per head)."""
    B, H, T, k = rows.shape
    t = torch.arange(T, device=rows.device).view(1, 1, T, 1)
    keys = (rows.long() * T + t).reshape(B * H, T * k)  # unique when a token's k rows are distinct
    sorted_keys, perm = keys.sort(dim=-1)
    bounds = (torch.arange(n_memories + 1, device=rows.device) * T).expand(B * H, -1).contiguous()
    offsets = torch.searchsorted(sorted_keys, bounds)
    return RoutedPairs(perm.to(torch.int32), offsets.to(torch.int32), document_index(doc_ids, B, T, rows.device))


def check_sparse_inputs(
    rows: torch.Tensor,
    theta_k: torch.Tensor,
    phi_k: torch.Tensor,
    xbar: torch.Tensor,
    n_memories: int,
    check_range: bool = False,
) -> None:
    """Shapes must agree. The row range check syncs with the device, so only the reference makes it (the
    kernels ignore out-of-range rows: their pairs fall outside every row's segment)."""
    if rows.dim() != 4 or theta_k.shape != rows.shape or phi_k.shape != rows.shape:
        raise ValueError(
            f"fm sparse: rows, theta_k, phi_k must share one (B, H, T, k) shape; got "
            f"{tuple(rows.shape)}, {tuple(theta_k.shape)}, {tuple(phi_k.shape)}"
        )
    if xbar.shape[:3] != rows.shape[:3]:
        raise ValueError(f"fm sparse: xbar {tuple(xbar.shape)} does not match rows {tuple(rows.shape)} in (B, H, T)")
    if check_range and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_memories):
        raise ValueError(f"fm sparse: rows must lie in [0, {n_memories}), got [{int(rows.min())}, {int(rows.max())}]")


def sparse_fm_reference(
    rows: torch.Tensor,
    theta_k: torch.Tensor,
    phi_k: torch.Tensor,
    xbar: torch.Tensor,
    n_memories: int,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Readable PyTorch version of the sparse formulation (differentiable by autograd).

    rows (B, H, T, k) distinct row indices per token; theta_k, phi_k (B, H, T, k) their write/read weights;
    xbar (B, H, T, d_mem); doc_ids (B, T); initial_state (B, H, m, d_mem). Same results as `naive_fm` on the
    dense weights that are theta_k / phi_k at `rows` and zero elsewhere.

    Step j of the loop advances every row's segment by its j-th pair, so it runs max-pairs-per-row steps.
    """
    B, H, T, k = rows.shape
    m, d = n_memories, xbar.shape[-1]
    check_sparse_inputs(rows, theta_k, phi_k, xbar, m, check_range=True)
    pairs = sort_pairs(rows, m, doc_ids)
    dt = state_dtype(theta_k)
    perm, offsets = pairs.perm.long(), pairs.offsets.long()
    BH, P = perm.shape
    head = torch.arange(BH, device=rows.device)
    row = rows.reshape(BH, P).gather(1, perm)  # row of each sorted pair
    tok = perm // k  # token of each sorted pair
    if bool((row[:, 1:] == row[:, :-1]).logical_and(tok[:, 1:] == tok[:, :-1]).any()):
        raise ValueError("fm sparse: a token routes to the same row twice; rows must be distinct per token")
    rank = torch.arange(P, device=rows.device) - offsets.gather(1, row)  # position within the row's segment
    seg = pairs.seg.long().repeat_interleave(H, dim=0).gather(1, tok)  # document of each sorted pair
    theta = theta_k.reshape(BH, P).to(dt).gather(1, perm)
    phi = phi_k.reshape(BH, P).to(dt).gather(1, perm)
    x = xbar.reshape(BH, T, d).to(dt)

    h = xbar.new_zeros(BH, m, d, dtype=dt) if initial_state is None else initial_state.reshape(BH, m, d).to(dt)
    h_seg = torch.zeros(BH, m, dtype=torch.long, device=rows.device)  # document of each row's state
    y = xbar.new_zeros(BH, P, d, dtype=dt)  # phi * h per sorted pair
    for j in range(int(rank.max()) + 1 if P else 0):
        hb, p = (rank == j).nonzero(as_tuple=True)  # the j-th pair of every row that has one
        r, s, th = row[hb, p], seg[hb, p], theta[hb, p].unsqueeze(-1)
        keep = (h_seg[hb, r] == s).to(dt).unsqueeze(-1)  # 0: a document started since the row's last pair
        new = keep * (1 - th) * h[hb, r] + th * x[hb, tok[hb, p]]
        h = h.index_put((hb, r), new)
        h_seg = h_seg.index_put((hb, r), s)
        y = y.index_put((hb, p), phi[hb, p].unsqueeze(-1) * new)

    # Back to token order, then each token sums its k pairs.
    y_tok = torch.zeros_like(y).index_put((head.unsqueeze(1).expand_as(perm), perm), y)
    r_out = y_tok.view(B, H, T, k, d).sum(3).to(xbar.dtype)
    if not output_final_state:
        return r_out, None
    last_doc = pairs.seg[:, -1].repeat_interleave(H).unsqueeze(1)  # rows not written in the last document: 0
    final = h * (h_seg == last_doc).to(dt).unsqueeze(-1)
    return r_out, final.view(B, H, m, d)


def dense_from_sparse(rows: torch.Tensor, values: torch.Tensor, n_memories: int) -> torch.Tensor:
    """(B, H, T, k) values at rows -> (B, H, T, m) with zeros elsewhere (for tests and the dense comparison)."""
    out = values.new_zeros(*rows.shape[:-1], n_memories)
    return out.scatter(-1, rows.long(), values)


def synthetic_routing(
    B: int, H: int, T: int, m: int, k: int, d_mem: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random sparse FM inputs at any size without an (m)-wide router: rows, theta_k, phi_k, xbar.

    A token's k rows are base + j * (m // k) mod m (distinct, spread over all rows); the weights are a softmax
    over k times rates in (0, 1). For GPU tests and benchmarks, where a (B, H, T, m) router would be large.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randint(0, m, (B, H, T, 1), generator=gen, device=device)
    rows = (base + torch.arange(k, device=device) * (m // k)) % m
    a_k = torch.softmax(torch.randn(B, H, T, k, generator=gen, device=device), -1)
    theta_k = torch.rand(B, H, T, k, generator=gen, device=device) * a_k
    phi_k = torch.rand(B, H, T, k, generator=gen, device=device) * a_k
    xbar = torch.randn(B, H, T, d_mem, generator=gen, device=device)
    return rows, theta_k.to(dtype), phi_k.to(dtype), xbar.to(dtype)
