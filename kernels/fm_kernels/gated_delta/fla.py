"""flash-linear-attention's Triton kernel for the gated delta rule (`fla.ops.gated_delta_rule.chunk_gated_delta_rule`,
MIT licence) behind our contract: an optional backend, checked against `naive.naive_gated_delta`.

fla is an optional dependency (the `fla` package of `fla-core`, also pulled in by `flash-linear-attention`),
imported on the first call; its kernels need CUDA tensors (they do not run in Triton's CPU interpreter).

How our contract maps onto fla's (all of it through the public API):
- layout: ours is head-first (B, H, T, .), fla's time-first (B, T, H, .): transposed in and out;
- the layer already L2-normalises q, k and scales q, so `scale=1.0` and `use_qk_l2norm_in_kernel=False`;
- g is the natural-log decay (<= 0) in both; beta in [0, 1] already (no sigmoid in the kernel);
- documents: fla restarts the state only between the sequences of `cu_seqlens`, which needs batch 1, so with
  `doc_ids` the B rows are laid end to end as one row and every row start and document start begins a sequence;
  `initial_state[b]` becomes the initial state of row b's first sequence (the others start at zero) and the
  final state of row b is that of its last sequence, as in `chunk_gated_delta`;
- dtypes: q, k, v and beta in q's dtype, g and the states in fp32; float64 is refused (fla has no fp64 kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FLA_CHUNK_SIZES = (16, 32, 64)  # the chunk lengths fla's gated delta kernel accepts
INSTALL_HINT = "pip install fla-core==0.6.0 (or flash-linear-attention==0.6.0)"
_available: bool | None = None  # fla_available()'s answer, once asked


def _fla_op(device: torch.device) -> Callable:
    """fla's `chunk_gated_delta_rule`, imported here (late: importing fla is slow and needs triton)."""
    if device.type != "cuda":
        raise RuntimeError(
            f"gated delta backend 'fla' cannot run on {device}: flash-linear-attention's Triton kernels need CUDA "
            "tensors; use backend 'torch' or 'auto'"
        )
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        raise ImportError(
            f"gated delta backend 'fla' needs flash-linear-attention, which does not import ({e}): {INSTALL_HINT}, "
            "or use backend 'torch' or 'auto'"
        ) from e
    return chunk_gated_delta_rule


def fla_available() -> bool:
    """Whether fla's gated delta kernel imports here (the import is tried once; errors count as absent)."""
    global _available
    if _available is None:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401

            _available = True
        except Exception:  # noqa: BLE001 (an ImportError, or a broken install failing at import time)
            _available = False
    return _available


def documents_to_sequences(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """doc_ids (B, T) -> (cu_seqlens (N + 1,) int64, first (B,), last (B,)): the sequences of the B rows laid end to
    end (a new one at every row start and every change of document id), and the index of each row's first and
    last sequence, on doc_ids' device (the adapter passes CPU ids: fla wants the boundaries on the host too)."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    per_row = starts.sum(dim=1)
    last = per_row.cumsum(0) - 1
    first = last - per_row + 1
    begins = starts.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([begins, begins.new_full((1,), B * T)])
    return cu_seqlens, first, last


def fla_chunk_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunk_gated_delta` on fla's kernel. q, k (B, H, T, K); v (B, H, T, V); g, beta (B, H, T); doc_ids (B, T);
    initial_state (B, H, K, V) (applies to each row's first document). Returns o (B, H, T, V) in q's dtype and, if
    asked, the final state (B, H, K, V) in fp32. `chunk_size` is only a tiling choice: one of 16, 32, 64 is passed
    to fla, anything else becomes 64."""
    if torch.float64 in (q.dtype, k.dtype, v.dtype):
        raise ValueError("gated delta backend 'fla' has no float64 kernels; use backend 'torch' for float64")
    op = _fla_op(q.device)
    B, H, T, K = q.shape
    dt = q.dtype
    time_first = lambda x, dtype: x.transpose(1, 2).to(dtype).contiguous()  # noqa: E731 (B, H, T, .) -> (B, T, H, .)
    qf, kf, vf = time_first(q, dt), time_first(k, dt), time_first(v, dt)
    gf, bf = time_first(g, torch.float32), time_first(beta, dt)
    h0 = None if initial_state is None else initial_state.to(torch.float32)
    kwargs = dict(
        scale=1.0, output_final_state=output_final_state, use_qk_l2norm_in_kernel=False,
        chunk_size=chunk_size if chunk_size in FLA_CHUNK_SIZES else 64,
    )  # fmt: skip
    if doc_ids is None:
        o, final = op(qf, kf, vf, gf, bf, initial_state=h0, **kwargs)
        return o.transpose(1, 2).to(dt), (final.to(torch.float32) if output_final_state else None)
    cu_cpu, first, last = documents_to_sequences(doc_ids.cpu())  # the one host sync of this path
    cu_seqlens, first, last = (x.to(q.device, non_blocking=True) for x in (cu_cpu, first, last))
    flat = lambda x: x.reshape(1, B * T, *x.shape[2:])  # noqa: E731 rows end to end: batch 1, as cu_seqlens needs
    if h0 is not None:
        n = cu_seqlens.numel() - 1
        h0 = h0.new_zeros(n, *h0.shape[1:]).index_copy(0, first, h0)
    o, final = op(
        flat(qf), flat(kf), flat(vf), flat(gf), flat(bf), initial_state=h0, cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_cpu, **kwargs,
    )  # fmt: skip
    o = o.view(B, T, H, -1).transpose(1, 2).to(dt)
    return o, (final[last].to(torch.float32) if output_final_state else None)
