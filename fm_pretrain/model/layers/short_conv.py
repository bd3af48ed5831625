"""Short causal depthwise convolutions over time (GLA, Gated DeltaNet and Mixture-of-Memories' q/k/v option).

`causal_conv` is the one implementation: tap s (s items back) is dropped where that item lies in an earlier
document, or in another run (a run is a sequence of items that share one conv history: a batch row, or one
memory's routed tokens in MoM); a cache continues the window from the last d_conv - 1 inputs of the previous
call. `ShortConv` holds the weights (one (channels, d_conv) filter, no bias, SiLU after, as flash-linear-
attention's ShortConvolution), split by channel blocks under tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fm_kernels.gated.naive import document_index
from fm_pretrain.model.layers.rope import positions_from_doc_ids
from fm_pretrain.parallel.layers import split_param


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor | None = None, past: torch.Tensor | None = None
) -> torch.Tensor:
    """x (N, T, C) items in time order; weight (C, w), tap w - 1 multiplies the current item; pos (N, T) int64
    position of each item in its run (taps reaching further back than pos are dropped; None: never dropped);
    past (N, w - 1, C) the inputs before x (None: zeros). Returns (N, T, C) in x's dtype."""
    N, T, C = x.shape
    w = weight.shape[-1]
    before = x.new_zeros(N, w - 1, C) if past is None else past.to(x.dtype)
    xpad = torch.cat([before, x], dim=1)
    out = x * weight[:, w - 1]
    for s in range(1, w):
        src = xpad[:, w - 1 - s : w - 1 - s + T]
        if pos is not None:
            src = src * (pos >= s).to(src.dtype)[..., None]
        out = out + src * weight[:, w - 1 - s]
    return out


class ShortConv(nn.Module):
    """Depthwise causal conv + SiLU over the concatenated channel blocks `blocks` (full, TP = 1 widths), e.g.
    q | k | v; each block is split across TP ranks like the column-parallel projection that feeds it.

    forward(x (B, T, C_local), doc_ids (B, T) or None, cache dict or None, key) -> (B, T, C_local). With a cache,
    the last d_conv - 1 inputs are kept under cache[key] (B, d_conv - 1, C_local) for the next call."""

    def __init__(self, blocks: tuple[int, ...], d_conv: int, tp: int = 1):
        super().__init__()
        self.d_conv = d_conv
        local = sum(blocks) // tp
        self.weight = split_param(nn.Parameter(torch.empty(local, d_conv)), tp, segments=blocks)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's Conv1d default (kaiming-uniform, fan_in = d_conv): uniform in +-1/sqrt(d_conv)."""
        bound = 1.0 / self.d_conv**0.5
        self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None, key: str = "conv"):
        past = None if cache is None else cache.get(key)
        pos = None if doc_ids is None else positions_from_doc_ids(doc_ids)
        if pos is not None and past is not None:  # the call's first document continues the cached window
            first_doc = document_index(doc_ids, *doc_ids.shape, doc_ids.device) == 0
            pos = pos + first_doc.long() * (self.d_conv - 1)
        out = causal_conv(x, self.weight.to(x.dtype), pos, past)
        if cache is not None:
            before = x.new_zeros(x.shape[0], self.d_conv - 1, x.shape[2]) if past is None else past.to(x.dtype)
            cache[key] = torch.cat([before, x], dim=1)[:, -(self.d_conv - 1) :] if self.d_conv > 1 else before
        return F.silu(out)
