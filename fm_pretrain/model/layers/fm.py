"""Factorization Memory token mixer (FM_SPEC.md, steps 1-8), on top of the `fm_kernels` entry point.

Per head: a router picks rows of an (m x d_mem) memory with softmax affinities (top-k for the sparse
variant); write weights theta = eta * a and read weights phi = mu * a drive the recurrence
H_t[i] = (1 - theta_t[i]) H_{t-1}[i] + theta_t[i] xbar_t and the read r_t = H_t^T phi_t.

Initialisation (the paper states none): every projection N(0, init_std) as set by the LM, the output
projection scaled down with depth, and the rate biases b_eta = b_mu = rate_bias_init (sigma(0) = 0.5).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.fm import fm_recurrence, fm_recurrence_sparse, fm_step, fm_step_sparse, resolve_backend
from fm_pretrain.config import FMConfig
from fm_pretrain.parallel.layers import column_linear, row_linear, split_param, tp_mean
from fm_pretrain.parallel.sharding import local_size

log = logging.getLogger(__name__)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Router and rates run in fp32 (fp64 stays fp64, so references can be checked tightly)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def route(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Softmax router in fp32 over the last dim; keeps the top-k and renormalises them to sum to 1.

    Returns (a, alpha, rows): a the routing weights (zeros outside the kept rows), alpha the full softmax
    (for the balancing loss), rows the kept indices (None for the dense variant).
    """
    alpha = torch.softmax(at_least_fp32(logits), dim=-1)
    m = alpha.shape[-1]
    if top_k is None or top_k >= m:
        return alpha, alpha, None
    vals, rows = alpha.topk(top_k, dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True)
    a = torch.zeros_like(alpha).scatter(-1, rows, vals)
    return a, alpha, rows


def load_balancing_loss(alpha: torch.Tensor, rows: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Switch-style loss m * sum_i f_i P_i, averaged over heads: f_i share of routed slots, P_i mean prob.

    alpha (..., H, m) with any leading token dims. Equals 1 at a perfectly balanced router.
    """
    m = alpha.shape[-1]
    probs = alpha.reshape(-1, alpha.shape[-2], m)  # (N, H, m)
    if rows is None:
        frac = probs.mean(0)  # dense: every row is written in proportion to its weight
    else:
        hits = torch.zeros_like(probs).scatter(-1, rows.reshape(-1, rows.shape[-2], rows.shape[-1]), 1.0)
        frac = hits.mean(0) / top_k
    return m * (frac * probs.mean(0)).sum(-1).mean()


class FactorizationMemory(nn.Module):
    """Tensor parallel (tp > 1): each rank owns n_heads / tp whole heads (router, rates, memory state and
    read norm of a head never leave its rank); W_alpha, W_eta, W_mu, W_i, W_gate are split by head
    (column), W_o by its input (row), so the only communication is W_o's all-reduce."""

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

    def _gates(self, x: torch.Tensor):
        """theta, phi (B, H, T, m), xbar (B, H, T, d_mem), plus routing extras for the loss and decode."""
        B, T, _ = x.shape
        H, m = self.n_heads, self.n_memories
        logits = self.w_alpha(x).view(B, T, H, m) / self.cfg.tau
        a, alpha, rows = route(logits, self.top_k)
        eta = torch.sigmoid(at_least_fp32(self.w_eta(x) + self.b_eta)).view(B, T, H, -1)
        mu = torch.sigmoid(at_least_fp32(self.w_mu(x) + self.b_mu)).view(B, T, H, -1)
        theta = (eta * a).transpose(1, 2)
        phi = (mu * a).transpose(1, 2)
        xbar = self.w_i(x).view(B, T, H, self.d_mem).transpose(1, 2)
        return theta, phi, xbar, alpha, rows, eta, mu, a

    def _output(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """r (B, H, T, d_mem) -> y (B, T, d_model): per-head RMSNorm, optional SiLU gate, W_o."""
        B, H, T, d = r.shape
        r32 = at_least_fp32(r)
        r32 = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        r32 = r32 * self.read_norm_weight.to(r32.dtype)[None, :, None, :]
        y = r32.transpose(1, 2).reshape(B, T, H * d).to(x.dtype)
        if self.w_gate is not None:
            y = y * F.silu(self.w_gate(x))
        return self.w_o(y)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None):
        if self.backend is None:
            self.backend = resolve_backend(self.cfg.backend, x.device)
            if self.layer_idx == 0:
                log.info("FM layers use the '%s' backend on %s", self.backend, x.device)
        theta, phi, xbar, alpha, rows, eta, mu, a = self._gates(x)
        self.aux_loss = None
        if self.training and self.cfg.aux_loss_weight > 0:
            top_k = self.top_k or self.n_memories
            # The loss averages over heads: this rank's heads, then the mean over TP ranks.
            self.aux_loss = self.cfg.aux_loss_weight * tp_mean(load_balancing_loss(alpha, rows, top_k), self.tp)

        final = None
        if cache is not None and x.shape[1] == 1 and "state" in cache:
            r = self._decode_step(cache, theta, phi, xbar, rows, eta, mu, a)
        elif self.top_k is not None and self.backend == "triton":  # sparse kernels: O(k d_mem) per token
            theta_k, phi_k = self._routed_weights(rows, eta, mu, a)
            r, final = fm_recurrence_sparse(
                rows.transpose(1, 2),
                theta_k.transpose(1, 2),
                phi_k.transpose(1, 2),
                xbar,
                self.n_memories,
                doc_ids=doc_ids,
                initial_state=None if cache is None else cache.get("state"),
                output_final_state=cache is not None,
                backend=self.backend,
            )
        else:
            r, final = fm_recurrence(
                theta,
                phi,
                xbar,
                doc_ids=doc_ids,
                initial_state=None if cache is None else cache.get("state"),
                output_final_state=cache is not None,
                chunk_size=self.cfg.chunk_size,
                backend=self.backend,
            )
        if cache is not None and final is not None:  # prefill: the parallel path's final state seeds decoding
            cache["state"] = final
        return self._output(r, x)

    def _decode_step(self, cache, theta, phi, xbar, rows, eta, mu, a) -> torch.Tensor:
        """One token with the state in the cache; the sparse variant touches only its k rows."""
        state = cache["state"]
        if rows is None:
            r, cache["state"] = fm_step(state, theta[:, :, 0], phi[:, :, 0], xbar[:, :, 0])
        else:
            rows_t = rows[:, 0]  # (B, H, k)
            theta_k, phi_k = self._routed_weights(rows_t, eta[:, 0], mu[:, 0], a[:, 0])
            r, cache["state"] = fm_step_sparse(state, rows_t, theta_k, phi_k, xbar[:, :, 0], backend=self.backend)
        return r.unsqueeze(2)

    @staticmethod
    def _routed_weights(rows, eta, mu, a) -> tuple[torch.Tensor, torch.Tensor]:
        """theta_k = eta_k a_k, phi_k = mu_k a_k (..., H, k) at the routed rows (rates broadcast if per head)."""
        a_k = a.gather(-1, rows)
        eta_k = eta if eta.shape[-1] == 1 else eta.gather(-1, rows)
        mu_k = mu if mu.shape[-1] == 1 else mu.gather(-1, rows)
        return eta_k * a_k, mu_k * a_k
