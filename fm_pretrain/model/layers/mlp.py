"""SwiGLU feed-forward block of the LLaMA-style decoder (tensor parallel: gate/up by column, down by row)."""

import torch
import torch.nn.functional as F
from torch import nn

from fm_pretrain.parallel.layers import column_linear, row_linear


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, tp: int = 1):
        super().__init__()
        self.w_gate = column_linear(d_model, hidden, tp)
        self.w_up = column_linear(d_model, hidden, tp)
        self.w_down = row_linear(hidden, d_model, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
