"""Memory Caching (Behrouz, Li, Deng, Zhong, Razaviyayn, Mirrokni 2026) around a linear-memory mixer: FM (dense or
sparse), GLA, Gated DeltaNet or Mamba-2 (`model.memory_caching`; ../shared/MEMORY_FAMILY_SPEC.md,
docs/memory_family.md).

The sequence is cut into segments (constant size U, or logarithmic: the binary expansion of the position in units
of U, largest first), counted from each document's start. Inside a segment the mixer's own memory runs as usual
(the online memory); the state at the end of each segment is cached. A token reads its online memory and its
cached states: residual (sum), GRM (softmax gates over <u_t, c^(i)>, u_t = W_u x_t per head, c^(i) the mean of u
(or of the keys) over segment i, the online segment's mean so far), soup (= GRM for a linear memory) or SSC (the
top_k_segments cached segments by score plus the online one). `checkpoint` states continue from segment to
segment (a cached state summarises the whole prefix), `independent` ones restart at zero. The combined read
replaces the mixer's read before its output stage (norm, gate, W_o; Mamba-2: the D skip, gated norm, out_proj).

Implementation (fm_kernels.caching): the online memory is the variable-length chunked scan over documents (so the
cached states are its own chunk-boundary states, U being a multiple of the chunk size) on every device, in
PyTorch; a sparse FM layer's dense scan uses its zero-filled weights, but its reads of cached states gather only
the token's k rows.

Generation cache: the base mixer's keys (its conv window for GLA / Gated DeltaNet / Mamba-2) plus "mc", a
`fm_kernels.caching.CachingState`: the online state, the cached states (B, N, H, K, V) growing by one per completed
segment, their descriptor sums, and each row's position; `cache_bytes(cache["mc"])` reports its size. The first
call with a cache runs the parallel path; later calls (decoding, or a prefill continued in pieces) run the
per-token step. Left-padding positions (model/cache.py) are identity steps that no segment counts.

Tensor parallel: the base mixer is split by heads as usual; W_u is split by head (column-parallel); the cached
states and reads are per head, hence local to the rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fm_kernels.caching import CachingSpec, caching_step, empty_like, memory_caching, where_rows
from fm_kernels.fm import fm_log_decay
from fm_pretrain.config import MemoryCachingConfig
from fm_pretrain.model.cache import advance, pad_positions
from fm_pretrain.model.layers.linear_memory import MemoryInputs, identity_at
from fm_pretrain.model.mom_caching import mom_caching_forward
from fm_pretrain.parallel.layers import column_linear, tp_mean


class _Inputs(NamedTuple):
    inputs: MemoryInputs
    read_rows: tuple[torch.Tensor, torch.Tensor] | None  # sparse FM: (phi_k, rows) (B, H, T, k)


class MemoryCaching(nn.Module):
    def __init__(self, base: nn.Module, cfg: MemoryCachingConfig, d_model: int, tp: int = 1):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.spec = CachingSpec(cfg.aggregation, cfg.segmentation, cfg.segment_size, cfg.state_mode, cfg.top_k_segments)
        self.is_fm = hasattr(base, "_gates")
        self.is_mom = hasattr(base, "pair_inputs")  # MoM: its own forward (model/mom_caching.py)
        if self.is_fm:
            self.key_width, self.chunk_size, n_heads = base.n_memories, base.cfg.chunk_size, base.cfg.n_heads
        else:
            self.key_width, self.chunk_size, n_heads = base.d_key, base.cfg.chunk_size, base.n_heads * tp
        self.width = self.key_width if cfg.descriptor == "keys" else cfg.d_gate
        self.w_u = column_linear(d_model, n_heads * self.width, tp) if cfg.aggregation != "residual" else None
        self.tp = tp
        self._aux_loss: torch.Tensor | None = None

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self._aux_loss if self.is_fm else getattr(self.base, "aux_loss", None)

    @property
    def router_stats(self):
        """The base FM layer's router-statistics accumulator (training/components.py attaches it to every FM
        layer's mixer; the wrapper forwards it, and updates it as FM's own forward does)."""
        return getattr(self.base, "router_stats", None)

    @router_stats.setter
    def router_stats(self, accumulator) -> None:
        self.base.router_stats = accumulator

    def __getattr__(self, name: str):
        """What the wrapper does not define is the base mixer's (n_heads, n_memories, layer_idx, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def _inputs(self, x: torch.Tensor, doc_ids, cache) -> _Inputs:
        """The base mixer's recurrence inputs (and sparse FM's rows for reading cached states)."""
        if not self.is_fm:
            return _Inputs(self.base.memory_inputs(x, doc_ids, cache), None)
        fm = self.base
        with_loss = self.training and fm.cfg.aux_loss_weight > 0
        g = fm._gates(x, with_alpha=with_loss)
        stats = getattr(fm, "router_stats", None)
        if stats is not None and self.training:  # as FM's own forward: sums on the device, no host sync
            stats.update(fm.layer_idx, g.a, None if g.rows is None else g.rows.transpose(1, 2))
        self._aux_loss = None
        if with_loss:
            from fm_pretrain.model.layers.fm import load_balancing_loss

            rows = None if g.rows is None else g.rows.transpose(1, 2)
            top_k = fm.top_k or fm.n_memories
            self._aux_loss = fm.cfg.aux_loss_weight * tp_mean(load_balancing_loss(g.alpha, rows, top_k), self.tp)
        theta, phi = g.dense_weights(fm.n_memories)
        inputs = MemoryInputs(q=phi, k=theta, v=g.xbar, g=fm_log_decay(theta))
        inputs = identity_at(inputs, pad_positions(cache, x.shape[1], x.device))
        return _Inputs(inputs, None if g.rows is None else (g.phi, g.rows))

    def _output(self, o: torch.Tensor, x: torch.Tensor, context) -> torch.Tensor:
        return self.base._output(o, x) if self.is_fm else self.base.memory_output(o, x, context)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, d_model), doc_ids (B, T) -> y (B, T, d_model); see the module docstring for the cache."""
        if self.is_mom:
            return mom_caching_forward(self, x, doc_ids, cache)
        B, T, _ = x.shape
        pad = pad_positions(cache, T, x.device)
        inp, read_rows = self._inputs(x, doc_ids, cache)
        H = inp.q.shape[1]
        if self.w_u is not None:
            u = self.w_u(x).view(B, T, H, self.width).transpose(1, 2)
        else:  # residual: no scores
            u = x.new_zeros(B, H, T, self.width)
        desc = inp.k if self.cfg.descriptor == "keys" else u
        if cache is not None and "mc" in cache:
            o = self._steps(inp, u, desc, read_rows, cache, pad)
        else:
            docs = doc_ids
            if pad is not None:  # the padding is a document of its own, before the real one
                docs = (~pad).long() if doc_ids is None else doc_ids * 2 + (~pad).long()
            o, st = memory_caching(
                q=inp.q, k=inp.k, v=inp.v, g=inp.g, beta=inp.beta, u=u, desc=desc, spec=self.spec, doc_ids=docs,
                read_rows=read_rows, chunk_size=self.chunk_size, output_state=cache is not None,
            )  # fmt: skip
            if cache is not None:
                if pad is not None:  # rows whose prompt has not started yet: an empty cache
                    st = where_rows(pad[:, -1], empty_like(st), st)
                cache["mc"] = st
        advance(cache, T)
        return self._output(o.to(x.dtype), x, inp.context)

    def _steps(self, inp: MemoryInputs, u, desc, read_rows, cache: dict, pad) -> torch.Tensor:
        """Tokens one at a time from the cached CachingState (decoding, or a prefill continued in pieces)."""
        outs = []
        for t in range(inp.q.shape[2]):

            def at(z: torch.Tensor | None, t: int = t) -> torch.Tensor | None:
                return None if z is None else z[:, :, t]

            rr = None if read_rows is None else (read_rows[0][:, :, t], read_rows[1][:, :, t])
            y, st = caching_step(
                cache["mc"], q=at(inp.q), k=at(inp.k), v=at(inp.v), g=at(inp.g), beta=at(inp.beta), u=at(u),
                desc=at(desc), spec=self.spec, read_rows=rr,
            )  # fmt: skip
            if pad is not None:  # padding rows stay where they were
                st = where_rows(pad[:, t], cache["mc"], st)
            cache["mc"] = st
            outs.append(y)
        return torch.stack(outs, dim=2)
