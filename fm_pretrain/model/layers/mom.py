"""Mixture-of-Memories (MoM; Du, Sun et al. 2025) as a token mixer (docs/memory_family.md).

One router per layer sends each token to k of M memories; each memory is a linear memory (per head, K x V) with
its own key, value and gate projections; one query projection serves all of them; an optional shared memory is
written and read by every token:

    p_t = softmax(W_r x_t) (fp32), top-k, renormalised: w_t (k non-zeros)
    memory j, routed:      S^j_t = update(S^j_{t-1}; k^j_t = W_k^j x_t, v^j_t = W_v^j x_t, gates^j_t)
    memory j, not routed:  S^j_t = S^j_{t-1}   (exactly unchanged: no decay, no write)
    o_t = sum_{j in top-k} w_t[j] (S^j_t)^T q_t + (S^shared_t)^T q_t,   y_t = W_o (RMSNorm(o_t) * silu(W_gate x_t))

update (`inner`): `gla`, S = diag(exp(g)) S + k v^T with g = logsigmoid(W_g x) / gate_norm per key; or
`gated_delta`, S = a (I - beta k k^T) S + beta k v^T with k L2-normalised, beta = sigmoid(W_b x),
a = exp(-exp(A_log) softplus(W_a x + dt_bias)) (A_log, dt_bias per head, shared by the memories as in the
reference). q is scaled by 1/sqrt(K) (and L2-normalised for gated_delta). Short causal convolutions (`short_conv`,
default on for gated_delta): q over the token sequence, each memory's k, v over that memory's own tokens (weights
shared by the memories), the shared memory's k, v over the token sequence. Every memory resets at document starts.

Work per token is O(k): the T k (token, memory) pairs are sorted by memory with a stable sort, each memory's
projections run on its own pairs only (one matmul per memory), each (memory, row) runs its recurrence over its own
tokens as a variable-length sequence (`fm_kernels.mom`), and the weighted reads go back to their tokens. The
dense run over all M memories exists only as the reference (`fm_kernels.mom.naive_mom`, `dense_reference` here).

Balancing loss (training, `aux_loss_weight > 0`): Switch-style M sum_j f_j P_j (f_j: share of the routed slots
that went to memory j, P_j: mean router probability), added to the optimised loss like FM's. Router statistics:
an accumulator set as `router_stats` (model/router_stats.py, one head of M memories) receives every training
forward's routing, as FM layers' do.

Generation cache: "states" (B, M, H, K, V) fp32, "shared_state" (B, H, K, V); with short convs "q_conv",
"shared_conv" (B, d_conv - 1, .) and "kv_conv" (B, M, d_conv - 1, H (K + V)) (each memory's own last inputs).
A decoding step loads, updates and reads only the k routed memories (and their conv windows). Left-padding
positions (model/cache.py) route to no memory and are identity steps of the shared memory.

Tensor parallel (tp > 1): each rank owns n_heads / tp heads of every memory; W_q, each memory's and the shared
memory's projections (by block: k | v | gates), the conv channels, A_log, dt_bias and the norm weight are split by
head, W_o by its input. The router is replicated: its weights w pass through megatron's
`copy_to_tensor_model_parallel_region` (identity forward, all-reduce of the gradient), so every rank gets the full
gradient of w (all heads' reads), hence identical router gradients; the balancing loss is the same on every rank.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.fm.routing import at_least_fp32, topk_route
from fm_kernels.gated import resolve_backend
from fm_kernels.gated.naive import state_dtype
from fm_kernels.gated_delta import resolve_delta_backend
from fm_kernels.mom import canonical_routing, combine_reads, group_pairs, mom_scan, mom_step
from fm_pretrain.config import MoMConfig
from fm_pretrain.model.cache import advance, pad_positions
from fm_pretrain.model.layers.gated_delta import delta_gates, init_decay_parameters
from fm_pretrain.model.layers.linear_memory import HeadOutput, MemoryInputs, identity_at, l2_normalize, run_memory
from fm_pretrain.model.layers.short_conv import ShortConv, causal_conv
from fm_pretrain.parallel.layers import column_linear, split_param
from fm_pretrain.parallel.sharding import local_size

log = logging.getLogger(__name__)


def balance_loss(probs: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
    """Switch-style M sum_j f_j P_j: probs (N, M) router softmax, memories (N, k) the routed memories. 1 when
    balanced, M when every token goes to one memory."""
    M, k = probs.shape[-1], memories.shape[-1]
    hits = torch.zeros_like(probs).scatter(-1, memories, 1.0)
    return M * ((hits.mean(0) / k) * probs.mean(0)).sum()


class MixtureOfMemories(nn.Module):
    def __init__(self, d_model: int, cfg: MoMConfig, layer_idx: int = 0, norm_eps: float = 1e-5, tp: int = 1):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.tp = tp
        H_all, K, V, M = cfg.n_heads, cfg.d_key, cfg.d_value, cfg.n_memories
        H = local_size(H_all, tp, "model.mom.n_heads")
        self.n_heads, self.d_key, self.d_value, self.n_memories, self.top_k = H, K, V, M, cfg.top_k
        self.delta = cfg.inner == "gated_delta"
        self.use_conv = self.delta if cfg.short_conv is None else cfg.short_conv
        # Each memory's projection, in blocks split by head: k | v | gates (delta: a | b per head; gla: per key).
        blocks = (H_all * K, H_all * V, H_all, H_all) if self.delta else (H_all * K, H_all * V, H_all * K)
        self.local_blocks = [b // tp for b in blocks]
        self.router = nn.Linear(d_model, M, bias=False)  # replicated across TP ranks
        self.q_proj = column_linear(d_model, H_all * K, tp)
        self.memories = nn.ModuleList(column_linear(d_model, sum(blocks), tp, segments=blocks) for _ in range(M))
        self.shared = column_linear(d_model, sum(blocks), tp, segments=blocks) if cfg.shared_memory else None
        if self.delta:
            self.A_log = split_param(nn.Parameter(torch.empty(H)), tp)
            self.dt_bias = split_param(nn.Parameter(torch.empty(H)), tp)
            for p in (self.A_log, self.dt_bias):
                p._no_weight_decay = True
            init_decay_parameters(self.A_log, self.dt_bias, cfg.dt_min, cfg.dt_max)
        self.q_conv = ShortConv((H_all * K,), cfg.d_conv, tp) if self.use_conv else None
        self.kv_conv = ShortConv((H_all * K, H_all * V), cfg.d_conv, tp) if self.use_conv else None
        has_shared_conv = self.use_conv and cfg.shared_memory
        self.shared_conv = ShortConv((H_all * K, H_all * V), cfg.d_conv, tp) if has_shared_conv else None
        self.out = HeadOutput(d_model, H_all, V, cfg.output_gate, norm_eps, tp)
        self.aux_loss: torch.Tensor | None = None
        self.backend: str | None = None
        # Where to add this layer's routing while training: a model/router_stats.RouterStatsAccumulator for one
        # "head" of M memories (as FM layers get theirs from training/components.RouterMonitor), or None.
        self.router_stats = None

    # ---- routing and inputs ------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) -> memories (B, T, k) int64 in increasing order, weights (B, T, k) fp32 (the
        renormalised top-k of the router softmax), logits (B, T, M)."""
        logits = self.router(x)
        memories, weights = canonical_routing(*topk_route(logits, self.top_k))
        if self.tp > 1:  # every rank needs the gradient of w from all heads' reads (docstring)
            from fm_pretrain.parallel._megatron import tensor_parallel

            weights = tensor_parallel.copy_to_tensor_model_parallel_region(weights)
        return memories, weights, logits

    def _queries(self, x: torch.Tensor, doc_ids, cache, pad) -> torch.Tensor:
        """q (B, T, H, K), scaled (and L2-normalised for gated_delta)."""
        B, T, _ = x.shape
        q = self.q_proj(x)
        if self.q_conv is not None:
            q = self.q_conv(q if pad is None else q.masked_fill(pad[..., None], 0.0), doc_ids, cache, "q_conv")
        elif self.delta:
            q = F.silu(q)
        q = q.view(B, T, self.n_heads, self.d_key)
        return (l2_normalize(q) if self.delta else q) * self.d_key**-0.5

    def _memory_projections(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted (N, d) grouped by memory (counts[j] rows for memory j) -> (N, local k|v|gate width). Every
        memory's projection runs, on an empty slice if no row reaches it (so its gradient is 0, never None)."""
        outs, start = [], 0
        for proj, n in zip(self.memories, counts):
            outs.append(proj(x_sorted[start : start + n]))
            start += n
        return torch.cat(outs, dim=0)

    def _split(self, proj: torch.Tensor):
        """(..., k|v|gates) -> k (..., H, K), v (..., H, V), g and beta as the inner rule takes them (fp32)."""
        H, K, V = self.n_heads, self.d_key, self.d_value
        lead = proj.shape[:-1]
        parts = proj.split(self.local_blocks, dim=-1)
        k, v = parts[0].reshape(*lead, H, K), parts[1].reshape(*lead, H, V)
        if self.delta:
            g, beta = delta_gates(parts[2], parts[3], self.A_log, self.dt_bias)
            return l2_normalize(k), v, g, beta
        g = F.logsigmoid(parts[2].to(state_dtype(proj))).reshape(*lead, H, K) / self.cfg.gate_norm
        return k, v, g, None

    def _activate_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """Without convolutions the delta rule's k, v still pass a SiLU (as the reference's)."""
        return F.silu(kv) if self.delta else kv

    def _pair_conv(self, kv: torch.Tensor, pairs, B: int, T: int, cache: dict | None) -> torch.Tensor:
        """Causal conv of each memory's k | v over its own tokens: kv (P, C) in sorted pair order; tap s reads the
        pair s back in the same (memory, row, document) run, or that memory's cached window when the run continues
        it (the row's first document). Updates cache["kv_conv"] (B, M, w - 1, C). Returns silu(conv) (P, C)."""
        P, Cw = kv.shape
        w = self.kv_conv.d_conv
        M = self.n_memories
        idx = torch.arange(P, device=kv.device)
        seq = pairs.memory * B + pairs.token // T
        new_run = torch.ones(P, dtype=torch.bool, device=kv.device)
        new_run[1:] = (seq[1:] != seq[:-1]) | (pairs.doc[1:] != pairs.doc[:-1])
        pos = idx - torch.where(new_run, idx, torch.zeros_like(idx)).cummax(0).values
        past = None if cache is None else cache.get("kv_conv")  # (B, M, w - 1, C)
        past_seq = (
            kv.new_zeros(M * B, w - 1, Cw)
            if past is None
            else past.to(kv.dtype).transpose(0, 1).reshape(M * B, w - 1, Cw)
        )
        ext = torch.cat([kv, past_seq.reshape(-1, Cw), kv.new_zeros(1, Cw)])  # items | windows | a zero row
        zero_row = ext.shape[0] - 1
        continues = pairs.doc == 0  # the row's first document continues the cached window
        weight = self.kv_conv.weight.to(kv.dtype)
        out = kv * weight[:, w - 1]
        for s in range(1, w):
            back = s - pos  # > 0: the tap reaches before the run's first pair
            from_past = P + seq * (w - 1) + (w - 1) - back
            src = torch.where(pos >= s, idx - s, torch.where(continues & (back <= w - 1), from_past, zero_row))
            out = out + ext[src] * weight[:, w - 1 - s]
        if cache is not None:
            cache["kv_conv"] = self._new_windows(kv, past_seq, pairs, B, T, w).view(M, B, w - 1, Cw).transpose(0, 1)
        return F.silu(out)

    def _new_windows(self, kv, past_seq, pairs, B: int, T: int, w: int) -> torch.Tensor:
        """(M B, w - 1, C): each (memory, row)'s last w - 1 conv inputs after this call, zeros for positions in an
        earlier document than the row's last."""
        lay = pairs.layout
        counts = torch.bincount(pairs.memory * B + pairs.token // T, minlength=lay.n_seq)
        start = torch.cumsum(counts, 0) - counts
        r = counts[:, None] - (w - 1) + torch.arange(w - 1, device=kv.device)  # (M B, w - 1) offsets into the run
        item = (start[:, None] + r).clamp(min=0, max=max(kv.shape[0] - 1, 0))
        last_doc = pairs.rows_doc[:, -1].repeat(self.n_memories)[:, None]  # (M B, 1)
        if kv.shape[0]:
            from_items = kv[item] * ((r >= 0) & (pairs.doc[item] == last_doc)).to(kv.dtype)[..., None]
        else:
            from_items = kv.new_zeros(*item.shape, kv.shape[-1])
        past_idx = (w - 1 + r).clamp(min=0, max=w - 2)
        from_past = past_seq.gather(1, past_idx[..., None].expand(-1, -1, kv.shape[-1]))
        from_past = from_past * ((r < 0) & (last_doc == 0)).to(kv.dtype)[..., None]
        return torch.where((r >= 0)[..., None], from_items, from_past)

    # ---- forward -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, d_model), doc_ids (B, T) -> y (B, T, d_model). With a cache: T > 1 (or no states yet) runs the
        parallel path from the cached states and stores the final ones; T = 1 with states decodes one token."""
        B, T, _ = x.shape
        if self.backend is None:
            resolve = resolve_delta_backend if self.delta else resolve_backend  # shared memory: fla / Triton on CUDA
            self.backend = resolve("auto", x.device)
            if self.layer_idx == 0:
                log.info("MoM layers use the '%s' backend for the shared memory on %s", self.backend, x.device)
        pad = pad_positions(cache, T, x.device)
        memories, weights = self.routing(x)
        q = self._queries(x, doc_ids, cache, pad)
        decode = cache is not None and T == 1 and "states" in cache and (pad is None or not bool(pad.any()))
        if decode:
            o = self._decode_memories(x, q, memories, weights, cache)
        else:
            o = self._parallel_memories(x, q, memories, weights, doc_ids, cache, pad)
        if self.shared is not None:
            o = o + self._shared_memory(x, q, doc_ids, cache, pad, decode)
        advance(cache, T)
        return self.out(o.to(x.dtype), x)

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`route`, plus (training) the balance loss in `aux_loss` and the router statistics. -> memories,
        weights (B, T, k)."""
        B, T, _ = x.shape
        memories, weights, logits = self.route(x)
        self.aux_loss = None
        if self.training and self.cfg.aux_loss_weight > 0:
            probs = torch.softmax(at_least_fp32(logits), dim=-1).reshape(B * T, -1)
            self.aux_loss = self.cfg.aux_loss_weight * balance_loss(probs, memories.reshape(B * T, -1))
        if self.router_stats is not None and self.training:  # sums on the device, at the k routed memories
            self.router_stats.update(self.layer_idx, weights.detach()[:, :, None], memories[:, :, None])
        return memories, weights

    def pair_inputs(self, x, memories, doc_ids, cache, pad):
        """The routed pairs grouped by memory (`group_pairs`) and their k, v, g, beta (P, H, .) in sorted order
        (each memory's projection on its own pairs; convs over its own tokens, updating cache["kv_conv"])."""
        B, T, d = x.shape
        pairs = group_pairs(memories, self.n_memories, doc_ids, exclude=pad, chunk=self.cfg.chunk_size)
        proj = self._memory_projections(x.reshape(B * T, d)[pairs.token], pairs.memory_counts)
        Hk, Hv = self.local_blocks[0], self.local_blocks[1]
        kv = proj[:, : Hk + Hv]
        kv = self._pair_conv(kv, pairs, B, T, cache) if self.kv_conv is not None else self._activate_kv(kv)
        return (pairs, *self._split(torch.cat([kv, proj[:, Hk + Hv :]], dim=-1)))

    def _parallel_memories(self, x, q, memories, weights, doc_ids, cache, pad) -> torch.Tensor:
        """The O(k) path: pairs grouped by memory, one variable-length scan per (memory, row). -> (B, H, T, V)."""
        B, T, d = x.shape
        pairs, k, v, g, beta = self.pair_inputs(x, memories, doc_ids, cache, pad)
        reads, final = mom_scan(
            pairs, q=q.reshape(B * T, self.n_heads, self.d_key)[pairs.token], k=k, v=v, g=g, beta=beta,
            initial_state=None if cache is None else cache.get("states"), output_final_state=cache is not None,
        )  # fmt: skip
        if cache is not None:
            cache["states"] = final
        return combine_reads(pairs, reads, weights)

    def _decode_memories(self, x, q, memories, weights, cache) -> torch.Tensor:
        """One token: only the k routed memories of each row are projected, loaded, updated and read.
        Returns (B, H, 1, V)."""
        k, v, g, beta = self.decode_inputs(x, memories, cache)
        o = mom_step(cache["states"], memories[:, 0], weights[:, 0], q[:, 0], k, v, g, beta)
        return o.unsqueeze(2)

    def decode_inputs(self, x, memories, cache):
        """One token x (B, 1, d), memories (B, 1, k): the k routed memories' k, v, g, beta (B, k, H, .), projected
        (grouped by memory) and convolved with their own windows only (cache["kv_conv"] updated)."""
        B, _, d = x.shape
        mem = memories[:, 0]  # (B, k)
        kk = mem.shape[1]
        flat_mem = mem.reshape(-1)
        order = torch.sort(flat_mem, stable=True).indices
        counts = torch.bincount(flat_mem, minlength=self.n_memories).tolist()
        proj_sorted = self._memory_projections(x[:, 0].repeat_interleave(kk, 0)[order], counts)
        proj = torch.empty_like(proj_sorted).index_copy(0, order, proj_sorted).view(B, kk, -1)
        Hk, Hv = self.local_blocks[0], self.local_blocks[1]
        kv = proj[..., : Hk + Hv]
        if self.kv_conv is not None:
            rows = torch.arange(B, device=x.device)[:, None].expand(B, kk)
            window = cache["kv_conv"][rows, mem]  # (B, k, w - 1, C): the routed memories' windows only
            flat = kv.reshape(B * kk, 1, -1)
            out = causal_conv(flat, self.kv_conv.weight.to(kv.dtype), None, window.reshape(B * kk, *window.shape[2:]))
            cache["kv_conv"][rows, mem] = torch.cat([window, kv[:, :, None]], dim=2)[:, :, 1:].to(
                cache["kv_conv"].dtype
            )
            kv = F.silu(out).view(B, kk, -1)
        else:
            kv = self._activate_kv(kv)
        return self._split(torch.cat([kv, proj[..., Hk + Hv :]], dim=-1))

    def _shared_memory(self, x, q, doc_ids, cache, pad, decode: bool) -> torch.Tensor:
        """The memory every token writes and reads, unweighted. -> (B, H, T, V)."""
        inp = self.shared_inputs(x, q, doc_ids, cache, pad)
        return run_memory(inp, doc_ids, cache, self.cfg.chunk_size, self.backend, key="shared_state", decode=decode)

    def shared_inputs(self, x, q, doc_ids, cache, pad) -> MemoryInputs:
        """The shared memory's recurrence inputs, head-major (B, H, T, .), identity steps at padding (its conv window
        in cache["shared_conv"] updated)."""
        B, T, _ = x.shape
        proj = self.shared(x)
        Hk, Hv = self.local_blocks[0], self.local_blocks[1]
        kv = proj[..., : Hk + Hv]
        if self.shared_conv is not None:
            kv = self.shared_conv(
                kv if pad is None else kv.masked_fill(pad[..., None], 0.0), doc_ids, cache, "shared_conv"
            )
        else:
            kv = self._activate_kv(kv)
        k, v, g, beta = self._split(torch.cat([kv, proj[..., Hk + Hv :]], dim=-1))
        hm = lambda t: None if t is None else t.transpose(1, 2)  # noqa: E731 (B, T, H, .) -> (B, H, T, .)
        return identity_at(MemoryInputs(q=hm(q), k=hm(k), v=hm(v), g=hm(g), beta=hm(beta)), pad)

    # ---- the dense reference (tests) -----------------------------------------------------------------------

    def dense_inputs(self, x: torch.Tensor):
        """Every memory's k, v and gates at every token (O(M) per token: for the reference only, without convs):
        k (B, M, H, T, K), v (B, M, H, T, V), g (B, M, H, T[, K]), beta (B, M, H, T) or None."""
        B, T, _ = x.shape
        per = [self._split(self._activate_kv_gates(proj(x))) for proj in self.memories]
        stack = lambda i: None if per[0][i] is None else torch.stack([p[i] for p in per], 1).transpose(2, 3)  # noqa: E731
        return stack(0), stack(1), stack(2), stack(3)

    def _activate_kv_gates(self, proj: torch.Tensor) -> torch.Tensor:
        Hkv = self.local_blocks[0] + self.local_blocks[1]
        return torch.cat([self._activate_kv(proj[..., :Hkv]), proj[..., Hkv:]], dim=-1)
