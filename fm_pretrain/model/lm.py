"""LLaMA-style decoder whose token mixer is chosen per layer by `layer_pattern` (FM, attention, Mamba-2).

Blocks are pre-norm: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Nothing here knows about
DeepSpeed, MLflow or Slurm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fm_pretrain.config import ModelConfig

from .layers.mlp import SwiGLU, swiglu_hidden
from .layers.norm import RMSNorm

IGNORE_INDEX = -100
# Names of the projections that write into the residual stream; their init is scaled down with depth.
RESIDUAL_OUT = ("w_o", "o_proj", "out_proj", "w_down")


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if kind == "fm":
        from .layers.fm import FactorizationMemory

        return FactorizationMemory(cfg.d_model, cfg.fm, layer_idx, cfg.norm_eps)
    if kind == "attention":
        from .layers.attention import Attention

        return Attention(cfg.d_model, cfg.attention, layer_idx, cfg.norm_eps)
    if kind == "mamba2":
        from .layers.mamba2 import Mamba2

        return Mamba2(cfg.d_model, cfg.mamba2, layer_idx, cfg.norm_eps)
    raise ValueError(f"unknown mixer '{kind}'")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.kind = cfg.mixer_of_layer(layer_idx)
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(self.kind, cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden or swiglu_hidden(cfg.d_model))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), doc_ids=doc_ids, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # language-model loss + auxiliary losses (what is optimised)
    lm_loss: torch.Tensor | None = None  # cross entropy alone (what is reported as the loss)
    aux_loss: torch.Tensor | None = None


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in RESIDUAL_OUT:
                nn.init.normal_(module.weight, mean=0.0, std=out_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        caches: list[dict] | None = None,
    ) -> LMOutput:
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, doc_ids, None if caches is None else caches[i])
        logits = self.lm_head(self.final_norm(x))
        if labels is None:
            return LMOutput(logits=logits)
        lm_loss = F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)).view(-1, logits.shape[-1]),
            labels.view(-1),
            ignore_index=IGNORE_INDEX,
        )
        aux = [b.mixer.aux_loss for b in self.blocks if getattr(b.mixer, "aux_loss", None) is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        loss = lm_loss if aux_loss is None else lm_loss + aux_loss
        return LMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prefill with the parallel path, then one token at a time with per-layer caches (greedy at T=0)."""
        caches: list[dict] = [{} for _ in self.blocks]
        logits = self(input_ids, caches=caches).logits[:, -1]
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt.squeeze(-1) == eos_id
                if bool(done.all()):
                    break
            logits = self(nxt, caches=caches).logits[:, -1]
        return torch.cat(out, dim=1)
