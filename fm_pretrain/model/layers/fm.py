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

from fm_kernels.fm import fm_recurrence, fm_step, fm_step_sparse, resolve_backend
from fm_pretrain.config import FMConfig

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
    def __init__(self, d_model: int, cfg: FMConfig, layer_idx: int = 0, norm_eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.norm_eps = norm_eps
        H, m, d_mem = cfg.n_heads, cfg.n_memories, cfg.d_mem
        self.n_heads, self.n_memories, self.d_mem = H, m, d_mem
        self.top_k = None if cfg.top_k is None or cfg.top_k >= m else cfg.top_k
        n_rates = m if cfg.rate_per_row else 1
        self.w_alpha = nn.Linear(d_model, H * m, bias=False)
        self.w_eta = nn.Linear(d_model, H * n_rates, bias=False)
        self.w_mu = nn.Linear(d_model, H * n_rates, bias=False)
        # Rate biases live outside nn.Linear so the LM's generic init does not zero them.
        self.b_eta = nn.Parameter(torch.full((H * n_rates,), cfg.rate_bias_init))
        self.b_mu = nn.Parameter(torch.full((H * n_rates,), cfg.rate_bias_init))
        self.w_i = nn.Linear(d_model, H * d_mem, bias=False)
        self.read_norm_weight = nn.Parameter(torch.ones(H, d_mem))  # RMSNorm of each head's read r_t
        self.w_gate = nn.Linear(d_model, H * d_mem, bias=False) if cfg.output_gate else None
        self.w_o = nn.Linear(H * d_mem, d_model, bias=False)
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
            self.aux_loss = self.cfg.aux_loss_weight * load_balancing_loss(alpha, rows, top_k)

        if cache is not None and x.shape[1] == 1 and "state" in cache:
            r = self._decode_step(cache, theta, phi, xbar, rows, eta, mu, a)
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
            if cache is not None:
                cache["state"] = final
        return self._output(r, x)

    def _decode_step(self, cache, theta, phi, xbar, rows, eta, mu, a) -> torch.Tensor:
        """One token with the state in the cache; the sparse variant touches only its k rows."""
        state = cache["state"]
        if rows is None:
            r, cache["state"] = fm_step(state, theta[:, :, 0], phi[:, :, 0], xbar[:, :, 0])
        else:
            rows_t = rows[:, 0]  # (B, H, k)
            a_k = a[:, 0].gather(-1, rows_t)
            eta_k = eta[:, 0] if eta.shape[-1] == 1 else eta[:, 0].gather(-1, rows_t)
            mu_k = mu[:, 0] if mu.shape[-1] == 1 else mu[:, 0].gather(-1, rows_t)
            r, cache["state"] = fm_step_sparse(state, rows_t, eta_k * a_k, mu_k * a_k, xbar[:, :, 0])
        return r.unsqueeze(2)
