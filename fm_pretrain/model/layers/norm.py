"""RMSNorm, computed in fp32 whatever the input dtype; the per-head read-out norm of the memory layers."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.to(x32.dtype)).to(x.dtype)


def head_readout(
    o: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate: Callable[[torch.Tensor], torch.Tensor] | None,
    out_proj: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The read-out of a memory layer (FM, GLA, Gated DeltaNet, MoM): o (B, H, T, V) per-head reads, x (B, T, d_model)
    the layer input -> (B, T, d_model). Each head's read is RMS-normalised in fp32 (fp64 stays fp64) with its own
    weight (norm_weight (H, V)), optionally gated by silu(gate(x)), then projected by out_proj."""
    B, H, T, V = o.shape
    o32 = o.to(torch.promote_types(o.dtype, torch.float32))
    o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)
    o32 = o32 * norm_weight.to(o32.dtype)[None, :, None, :]
    y = o32.transpose(1, 2).reshape(B, T, H * V).to(x.dtype)
    if gate is not None:
        y = y * F.silu(gate(x))
    return out_proj(y)
