"""Mamba-2 mixer (the SSM baseline): in_proj -> causal depthwise conv -> chunked SSD -> gated RMSNorm -> out_proj.

Follows the reference Mamba-2 block (mamba_ssm.modules.mamba2_simple) without its fused kernels. Packed
sequences: the convolution never reads a token of another document and the SSD state restarts at every
document start, so a packed document computes exactly what it would alone.

Generation cache (one dict per layer): "conv" (B, d_conv - 1, conv_dim) holds the last inputs of the
convolution, "ssm" (B, H, N, P) the fp32 SSD state. A prompt may be fed in several calls (chunked prefill), each
continuing both. Left-padding positions recorded in the cache (model/cache.py) are identity steps: their
convolution input is 0 (what a sequence start sees) and dt = 0 (no decay, no input to the state).
"""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.gated import resolve_backend, state_dtype
from fm_kernels.ssd import add_skip, ssd_chunked, ssd_inputs, ssd_step
from fm_pretrain.config import Mamba2Config
from fm_pretrain.model.cache import advance, pad_positions
from fm_pretrain.model.layers.linear_memory import MemoryInputs
from fm_pretrain.model.layers.rope import positions_from_doc_ids
from fm_pretrain.parallel.layers import column_linear, row_linear, split_param
from fm_pretrain.parallel.sharding import local_size

log = logging.getLogger(__name__)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of `group_size` channels, in fp32 (fp64 for fp64).

    Gate before the norm, as Mamba-2 does by default (norm_before_gate=False); one group per B/C group.
    """

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"group_size={group_size} must divide dim={dim}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(y.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        u = y.to(work) * F.silu(z.to(work))
        u = u.unflatten(-1, (-1, self.group_size))
        u = (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (u * self.weight.to(work)).to(y.dtype)


class Mamba2(nn.Module):
    """Tensor parallel (tp > 1): each rank owns n_heads / tp heads and n_groups / tp B/C groups (so n_groups
    must be a multiple of tp); in_proj is split by column within each of its z | x | B | C | dt blocks, the
    conv channels, dt_bias, A_log, D and the gated norm follow their heads, out_proj is split by row."""

    def __init__(self, d_model: int, cfg: Mamba2Config, layer_idx: int, norm_eps: float, tp: int = 1):
        super().__init__()
        d_inner = cfg.expand * d_model
        if d_inner % cfg.head_dim:
            raise ValueError(f"head_dim={cfg.head_dim} must divide expand * d_model = {d_inner}")
        n_heads = d_inner // cfg.head_dim
        if n_heads % cfg.n_groups:
            raise ValueError(f"n_groups={cfg.n_groups} must divide n_heads={n_heads}")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        # Sizes below are this rank's (all of them at tp == 1).
        self.n_heads = local_size(n_heads, tp, "model.mamba2 heads (expand * d_model / head_dim)")
        self.n_groups = local_size(cfg.n_groups, tp, "model.mamba2.n_groups")
        self.d_inner = self.n_heads * cfg.head_dim
        self.d_state = cfg.d_state
        self.d_key = cfg.d_state  # the key width of SSD seen as a linear memory (Memory Caching)
        self.d_conv = cfg.d_conv
        self.chunk_size = cfg.chunk_size
        self.backend: str | None = None  # SSD kernels: Triton on CUDA, PyTorch on CPU (FM_PRETRAIN_KERNELS forces)
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state

        bc = cfg.n_groups * cfg.d_state
        in_blocks = (d_inner, d_inner, bc, bc, n_heads)  # z | x | B | C | dt
        self.in_proj = column_linear(d_model, sum(in_blocks), tp, segments=in_blocks)
        # Holds the depthwise weights (C, 1, d_conv) and bias; _conv applies them with document masking.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=True)
        for p in (self.conv1d.weight, self.conv1d.bias):
            split_param(p, tp, segments=(d_inner, bc, bc))
        self.dt_bias = split_param(nn.Parameter(torch.empty(self.n_heads)), tp)
        self.A_log = split_param(nn.Parameter(torch.empty(self.n_heads)), tp)
        self.D = split_param(nn.Parameter(torch.empty(self.n_heads)), tp)
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, norm_eps)
        split_param(self.norm.weight, tp)
        self.out_proj = row_linear(d_inner, d_model, tp)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # mamba_ssm's marker: these are not weights to shrink
        self.reset_ssm_parameters(cfg.dt_min, cfg.dt_max)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float, dt_max: float) -> None:
        """softplus(dt_bias) log-uniform in [dt_min, dt_max]; A = -exp(A_log) uniform in [-16, -1]; D = 1."""
        u = torch.rand(self.n_heads, device=self.dt_bias.device, dtype=torch.float64)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.empty_like(dt).uniform_(1.0, 16.0).log())
        self.D.fill_(1.0)

    def _conv(self, xBC: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None) -> torch.Tensor:
        """Causal depthwise conv over time; tap s (s tokens back) is dropped where that token belongs to an
        earlier document. With a cache, the window continues from the stored last d_conv - 1 inputs."""
        B, T, C = xBC.shape
        w = self.d_conv
        if cache is not None:
            past = cache.get("conv")
            if past is None:
                past = xBC.new_zeros(B, w - 1, C)
            xpad = torch.cat([past.to(xBC.dtype), xBC], dim=1)
            cache["conv"] = xpad[:, T:]
        else:
            xpad = F.pad(xBC, (0, 0, w - 1, 0))
        pos = None if doc_ids is None else positions_from_doc_ids(doc_ids)[..., None]
        weight = self.conv1d.weight[:, 0]  # (C, w): tap w-1 multiplies the current token
        out = xBC * weight[:, w - 1] + self.conv1d.bias
        for s in range(1, w):
            src = xpad[:, w - 1 - s : w - 1 - s + T]
            if pos is not None:
                src = src * (pos >= s).to(src.dtype)  # the token s back lies in the same document
            out = out + src * weight[:, w - 1 - s]
        return out

    def _project(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None):
        """x (B, T, d_model) -> z (B, T, d_inner), xs (B, T, H, P), dt (B, T, H) and A (H,) in fp32 (fp64 for
        fp64), B, C (B, T, G, N). Continues the conv window in the cache; pad positions are identity steps."""
        Bsz, T, _ = x.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        pad = pad_positions(cache, T, x.device)
        if pad is not None:
            xBC = xBC.masked_fill(pad[..., None], 0.0)
        xBC = F.silu(self._conv(xBC, doc_ids, cache))
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        # Discretisation parameters in fp32 whatever the compute dtype (as the reference kernels do).
        work = state_dtype(x)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))
        if pad is not None:
            dt = dt.masked_fill(pad[..., None], 0.0)
        A = -torch.exp(self.A_log.to(work))
        return z, xs.view(Bsz, T, H, P), dt, A, Bm.view(Bsz, T, G, N), Cm.view(Bsz, T, G, N)

    def memory_inputs(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None) -> MemoryInputs:
        """SSD as a linear memory (Memory Caching): q = C, k = dt B (B, H, T, N), v = x (B, H, T, P), one
        log-decay per head g = dt A (B, H, T); `context` = (z, x) for the output stage (gate and D skip)."""
        z, xs, dt, A, Bm, Cm = self._project(x, doc_ids, cache)
        q, k, v, g = ssd_inputs(xs, dt, A, Bm, Cm)
        return MemoryInputs(q=q, k=k, v=v, g=g, context=(z, xs))

    def memory_output(self, o: torch.Tensor, x: torch.Tensor, context=None) -> torch.Tensor:
        """Reads o (B, H, T, P) -> y (B, T, d_model): the D skip, the gated RMSNorm, out_proj."""
        z, xs = context
        Bsz, T = x.shape[:2]
        y = add_skip(o.transpose(1, 2), xs, self.D)
        return self.out_proj(self.norm(y.reshape(Bsz, T, self.d_inner), z))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, d_model), doc_ids (B, T) -> y (B, T, d_model); with a cache dict (generation), doc_ids is None
        and T = 1 takes the O(1) decoding step, T > 1 the chunked path continuing the cached state."""
        if cache is not None and doc_ids is not None:
            raise ValueError("generation with a cache handles one document per row: pass doc_ids=None")
        Bsz, T, _ = x.shape
        z, xs, dt, A, Bm, Cm = self._project(x, doc_ids, cache)
        advance(cache, T)

        if cache is not None and T == 1:  # one decoding step: O(1) state update
            state = cache.get("ssm")
            if state is None:
                state = x.new_zeros(Bsz, self.n_heads, self.d_state, self.head_dim, dtype=dt.dtype)
            y, cache["ssm"] = ssd_step(state, xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], self.D)
            y = y[:, None]
        else:
            if self.backend is None:
                self.backend = resolve_backend("auto", x.device)
                if self.layer_idx == 0:
                    log.info("Mamba-2 layers use the '%s' kernel backend on %s", self.backend, x.device)
            y, final = ssd_chunked(
                xs, dt, A, Bm, Cm, self.D, doc_ids,
                initial_state=None if cache is None else cache.get("ssm"),
                output_final_state=cache is not None,
                chunk_size=self.chunk_size,
                backend=self.backend,
            )  # fmt: skip
            if cache is not None:
                cache["ssm"] = final
        return self.out_proj(self.norm(y.reshape(Bsz, T, self.d_inner), z))
