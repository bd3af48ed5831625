"""Factorization Memory token mixer (docs/fm_spec.md, steps 1-8), on top of the `fm_kernels` entry points.

Per head: a router picks rows of an (m x d_mem) memory with softmax affinities (top-k for the sparse
variant); write weights theta = eta * a and read weights phi = mu * a drive the recurrence
H_t[i] = (1 - theta_t[i]) H_{t-1}[i] + theta_t[i] xbar_t and the read r_t = H_t^T phi_t.

The dense variant forms theta, phi over all m rows. The sparse variant (top_k < m) forms nothing of size
T x m but the router logits: the top-k and their renormalised weights come from the logits directly
(`topk_route`), and per-row rates are computed only at the routed rows (`linear_at_rows`, which gathers rows
of W_eta and W_mu; a single token, the decode step, projects onto all m and gathers the k values instead), giving
theta, phi of shape (B, H, T, k) for the sparse kernels.

Initialisation (the paper states none): every projection N(0, init_std) as set by the LM, the output
projection scaled down with depth, and the rate biases b_eta = b_mu = rate_bias_init (sigma(0) = 0.5).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.fm import fm_recurrence, fm_recurrence_sparse, fm_step, fm_step_sparse, resolve_backend
from fm_kernels.fm.routing import at_least_fp32, linear_at_rows, route, topk_route
from fm_kernels.fm.sparse import dense_from_sparse
from fm_pretrain.config import FMConfig
from fm_pretrain.model.cache import advance, pad_positions
from fm_pretrain.model.layers.norm import head_readout
from fm_pretrain.parallel.layers import column_linear, row_linear, split_param, tp_mean
from fm_pretrain.parallel.sharding import local_size

log = logging.getLogger(__name__)

__all__ = ["FactorizationMemory", "Routing", "at_least_fp32", "load_balancing_loss", "route"]


class Routing(NamedTuple):
    """What the router and the input projections give the recurrence (spec steps 1-5), for this rank's H heads.

    B batch, T tokens, H heads, m rows, k = top_k, d_mem row width. Kernel-side fields are head-major
    (B, H, T, .), router-side fields token-major (B, T, H, .), as each is produced and consumed. The trailing
    extent is m for the dense variant; for the sparse variant it is k (values at `rows`), or 1 for rates that
    are one scalar per head (`rate_per_row: false`). Router-side tensors and theta, phi are fp32 (fp64 for an
    fp64 model); xbar is in the model's dtype.
    """

    theta: torch.Tensor
    """Write weights eta * a: dense (B, H, T, m); sparse (B, H, T, k), the weights at `rows`."""
    phi: torch.Tensor
    """Read weights mu * a: same shape as theta."""
    xbar: torch.Tensor
    """Values W_i x: (B, H, T, d_mem)."""
    rows: torch.Tensor | None
    """Sparse: the routed rows (B, H, T, k) int64, in descending order of router logit; dense: None."""
    alpha: torch.Tensor | None
    """The full router softmax (B, T, H, m), for the balancing loss: dense always (it is `a`); sparse only
    when asked for (training with aux_loss_weight > 0), else None, so that it is not formed."""
    a: torch.Tensor
    """Routing weights: dense (B, T, H, m) (= alpha); sparse (B, T, H, k), the softmax of the kept logits."""
    eta: torch.Tensor
    """Write rates sigma(W_eta x + b_eta): (B, T, H, m) dense, (B, T, H, k) sparse, (B, T, H, 1) per head."""
    mu: torch.Tensor
    """Read rates sigma(W_mu x + b_mu): same shape as eta."""

    def dense_weights(self, n_memories: int) -> tuple[torch.Tensor, torch.Tensor]:
        """theta, phi over all rows (B, H, T, m), zero outside `rows` (for references; sparse forms them here)."""
        if self.rows is None:
            return self.theta, self.phi
        return dense_from_sparse(self.rows, self.theta, n_memories), dense_from_sparse(self.rows, self.phi, n_memories)


def load_balancing_loss(alpha: torch.Tensor, rows: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Switch-style loss m * sum_i f_i P_i, averaged over heads: f_i share of routed slots, P_i mean prob.

    alpha (..., H, m) with any leading token dims; rows (..., H, k) with the same leading dims, or None for
    the dense variant. Equals 1 at a perfectly balanced router.
    """
    m = alpha.shape[-1]
    probs = alpha.reshape(-1, alpha.shape[-2], m)  # (N, H, m)
    if rows is None:
        frac = probs.mean(0)  # dense: every row is written in proportion to its weight
    else:
        hits = torch.zeros_like(probs).scatter(-1, rows.reshape(-1, rows.shape[-2], rows.shape[-1]), 1.0)
        frac = hits.mean(0) / top_k
    return m * (frac * probs.mean(0)).sum(-1).mean()


def without_padding(g: Routing, pad: torch.Tensor) -> Routing:
    """`g` with identity steps at the pad positions pad (B, T) bool: theta = 0 (no decay, no write) and xbar = 0,
    so the state after a run of pads is the state before it (model/cache.py: left-padded generation)."""
    head_major = pad[:, None, :, None]  # over (B, H, T, .)
    return g._replace(theta=g.theta.masked_fill(head_major, 0.0), xbar=g.xbar.masked_fill(head_major, 0.0))


class FactorizationMemory(nn.Module):
    """Tensor parallel (tp > 1): each rank owns n_heads / tp whole heads (router, rates, memory state and
    read norm of a head never leave its rank); W_alpha, W_eta, W_mu, W_i, W_gate are split by head
    (column), W_o by its input (row), so the only communication is W_o's all-reduce in the forward and the
    all-reduce of x's gradient in the backward (megatron's column layers; `_tp_input` for the gathered rates)."""

    def __init__(self, d_model: int, cfg: FMConfig, layer_idx: int = 0, norm_eps: float = 1e-5, tp: int = 1):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.norm_eps = norm_eps
        self.tp = tp
        H_all, m, d_mem = cfg.n_heads, cfg.n_memories, cfg.d_mem
        H = local_size(H_all, tp, "model.fm.n_heads")  # this rank's heads
        self.n_heads, self.n_memories, self.d_mem = H, m, d_mem
        self.top_k = None if cfg.top_k is None or cfg.top_k >= m else cfg.top_k
        n_rates = m if cfg.rate_per_row else 1
        self.w_alpha = column_linear(d_model, H_all * m, tp)
        self.w_eta = column_linear(d_model, H_all * n_rates, tp)
        self.w_mu = column_linear(d_model, H_all * n_rates, tp)
        # Rate biases live outside nn.Linear so the LM's generic init does not zero them.
        self.b_eta = split_param(nn.Parameter(torch.full((H * n_rates,), cfg.rate_bias_init)), tp)
        self.b_mu = split_param(nn.Parameter(torch.full((H * n_rates,), cfg.rate_bias_init)), tp)
        self.w_i = column_linear(d_model, H_all * d_mem, tp)
        self.read_norm_weight = split_param(nn.Parameter(torch.ones(H, d_mem)), tp)  # RMSNorm of each head's read
        self.w_gate = column_linear(d_model, H_all * d_mem, tp) if cfg.output_gate else None
        self.w_o = row_linear(H_all * d_mem, d_model, tp)
        self.aux_loss: torch.Tensor | None = None
        self.backend: str | None = None
        # Where to add this layer's routing while training (model/router_stats.RouterStatsAccumulator, attached
        # by the trainer); None: no statistics.
        self.router_stats = None

    def _gates(self, x: torch.Tensor, with_alpha: bool = False) -> Routing:
        """Router, rates and values for x (B, T, d_model) (spec steps 1-5); see `Routing` for every shape.

        with_alpha: also return the full softmax alpha (the balancing loss needs it); the dense variant has
        it anyway. The sparse variant's only (B, T, H, m) tensor is the router logits, otherwise.
        """
        B, T, _ = x.shape
        H, m = self.n_heads, self.n_memories
        logits = self.w_alpha(x).view(B, T, H, m)
        xbar = self.w_i(x).view(B, T, H, self.d_mem).transpose(1, 2)
        if self.top_k is None:  # dense: weights over all m rows
            a, alpha, _ = route(logits / self.cfg.tau, None)
            eta = torch.sigmoid(at_least_fp32(self.w_eta(x) + self.b_eta)).view(B, T, H, -1)
            mu = torch.sigmoid(at_least_fp32(self.w_mu(x) + self.b_mu)).view(B, T, H, -1)
            theta, phi = (eta * a).transpose(1, 2), (mu * a).transpose(1, 2)
            return Routing(theta=theta, phi=phi, xbar=xbar, rows=None, alpha=alpha, a=a, eta=eta, mu=mu)
        rows, a = topk_route(logits, self.top_k, self.cfg.tau)  # (B, T, H, k) each
        alpha = torch.softmax(at_least_fp32(logits / self.cfg.tau), dim=-1) if with_alpha else None
        eta = self._rates_at_rows(x, self.w_eta, self.b_eta, rows)
        mu = self._rates_at_rows(x, self.w_mu, self.b_mu, rows)
        theta, phi = (eta * a).transpose(1, 2), (mu * a).transpose(1, 2)
        return Routing(theta=theta, phi=phi, xbar=xbar, rows=rows.transpose(1, 2), alpha=alpha, a=a, eta=eta, mu=mu)

    def _rates_at_rows(self, x: torch.Tensor, proj: nn.Module, bias: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """sigma(W x + b) at the routed rows: x (B, T, d_model), rows (B, T, H, k) -> (B, T, H, k), fp32.

        Per-row rates gather the k rows of W (and b) per head instead of projecting onto all m (see
        `fm_kernels.fm.routing` for the cost), except for a single token (T = 1, the decode step), which projects
        onto all m and gathers the k values; one rate per head is a (B, T, H, 1) projection as in the dense
        variant. Row i of head h is row h * m + i of this rank's W (its heads are whole, so local indices serve).
        """
        B, T, H, k = rows.shape
        if not self.cfg.rate_per_row:
            return torch.sigmoid(at_least_fp32(proj(x) + bias)).view(B, T, H, 1)
        if T == 1:
            # One token (the decode step): the full projection W x + b onto all H m rows, one contiguous GEMV, then
            # the k routed values. Its (B, 1, H m) output is the size of the router logits this token forms anyway,
            # and it reads as much weight (H m d_model) as the router does, so it adds nothing of a T x m kind; it
            # saves linear_at_rows's per-token copy of H k gathered weight rows and its autograd Function (22% of
            # the sparse decode step on CPU at batch 1, docs/benchmarks.md). Same values up to the order of the
            # sums, and with autograd the same gradient shapes (W's is (H m, d_model) on both paths), so the rule
            # is T alone, whether or not a cache or a gradient is involved. T > 1 (training, prefill, even a short
            # chunk) keeps the gathered path: there the full projection would be a (B, T, H m) tensor with as large
            # a gradient, what the sparse variant exists to avoid, and one call's overhead is spread over T tokens.
            pre = F.linear(self._tp_input(x), proj.weight, bias).view(B, 1, H, self.n_memories)
            return torch.sigmoid(at_least_fp32(pre.gather(-1, rows)))
        head_base = torch.arange(H, device=rows.device).view(1, 1, H, 1) * self.n_memories
        index = (rows + head_base).view(B, T, H * k)
        # At tp > 1 a column-parallel layer all-reduces its input's gradient over the TP group; reading the
        # weight directly must do the same, or x's gradient would miss the other ranks' heads.
        pre = linear_at_rows(x=self._tp_input(x), weight=proj.weight, index=index, bias=bias)
        return torch.sigmoid(at_least_fp32(pre)).view(B, T, H, k)

    def _tp_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as a column-parallel layer sees it: identity forward; at tp > 1 the backward all-reduces over TP."""
        if self.tp == 1:
            return x
        from fm_pretrain.parallel._megatron import tensor_parallel

        return tensor_parallel.copy_to_tensor_model_parallel_region(x)

    def _output(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """r (B, H, T, d_mem) -> y (B, T, d_model): per-head RMSNorm, optional SiLU gate, W_o."""
        return head_readout(r, x, self.read_norm_weight, self.norm_eps, self.w_gate, self.w_o)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None):
        """x (B, T, d_model), doc_ids (B, T) -> y (B, T, d_model). With a cache dict: a prefill (T > 1, or no
        state yet) stores the final state (B, H, m, d_mem) under "state"; a single token then decodes from it.
        A prefill may come in several calls (chunked prefill), each continuing from the stored state; left-padding
        positions recorded in the cache ("start", model/cache.py) are identity steps."""
        if self.backend is None:
            self.backend = resolve_backend(self.cfg.backend, x.device)
            if self.layer_idx == 0:
                log.info("FM layers use the '%s' backend on %s", self.backend, x.device)
        with_loss = self.training and self.cfg.aux_loss_weight > 0
        g = self._gates(x, with_alpha=with_loss)
        if self.router_stats is not None and self.training:  # sums on the device: no host sync
            self.router_stats.update(self.layer_idx, g.a, None if g.rows is None else g.rows.transpose(1, 2))
        self.aux_loss = None
        if with_loss:
            top_k = self.top_k or self.n_memories
            rows = None if g.rows is None else g.rows.transpose(1, 2)  # (B, T, H, k), as alpha
            # The loss averages over heads: this rank's heads, then the mean over TP ranks.
            self.aux_loss = self.cfg.aux_loss_weight * tp_mean(load_balancing_loss(g.alpha, rows, top_k), self.tp)

        pad = pad_positions(cache, x.shape[1], x.device)
        if pad is not None:
            g = without_padding(g, pad)
        final = None
        initial_state = None if cache is None else cache.get("state")
        if cache is not None and x.shape[1] == 1 and "state" in cache:
            r = self._decode_step(cache, g)
        elif g.rows is not None:  # sparse: only the routed rows (Triton: O(k d_mem) per token, whatever m)
            r, final = fm_recurrence_sparse(
                rows=g.rows, theta_k=g.theta, phi_k=g.phi, xbar=g.xbar, n_memories=self.n_memories,
                doc_ids=doc_ids, initial_state=initial_state, output_final_state=cache is not None,
                chunk_size=self.cfg.chunk_size, backend=self.backend,
            )  # fmt: skip
        else:
            r, final = fm_recurrence(
                theta=g.theta, phi=g.phi, xbar=g.xbar, doc_ids=doc_ids, initial_state=initial_state,
                output_final_state=cache is not None, chunk_size=self.cfg.chunk_size, backend=self.backend,
            )  # fmt: skip
        if cache is not None and final is not None:  # prefill: the parallel path's final state seeds decoding
            cache["state"] = final
        advance(cache, x.shape[1])
        return self._output(r, x)

    def _decode_step(self, cache: dict, g: Routing) -> torch.Tensor:
        """One token (T = 1) with the state (B, H, m, d_mem) in the cache, updated there; returns r (B, H, 1, d_mem).

        The sparse variant touches only its k rows of the state (and of W_eta, W_mu)."""
        state = cache["state"]
        if g.rows is None:
            r, cache["state"] = fm_step(state=state, theta=g.theta[:, :, 0], phi=g.phi[:, :, 0], xbar=g.xbar[:, :, 0])
        else:
            r, cache["state"] = fm_step_sparse(
                state=state, rows=g.rows[:, :, 0], theta_k=g.theta[:, :, 0], phi_k=g.phi[:, :, 0],
                xbar=g.xbar[:, :, 0], backend=self.backend,
            )  # fmt: skip
        return r.unsqueeze(2)
