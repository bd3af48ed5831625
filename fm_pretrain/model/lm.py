"""LLaMA-style decoder whose token mixer is chosen per layer by `layer_pattern` (FM, attention, Mamba-2).

Blocks are pre-norm: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Nothing here knows about
DeepSpeed, MLflow or Slurm. With `parallel.tensor_parallel > 1` the projections, embedding and LM head are
megatron-core tensor-parallel layers (docs/parallelism.md); at 1 they are plain PyTorch modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fm_pretrain.config import ModelConfig, ParallelConfig
from fm_pretrain.data import IGNORE_INDEX
from fm_pretrain.parallel.layers import padded_vocab, vocab_embedding, vocab_head
from fm_pretrain.parallel.sharding import full_numel

from .layers.mlp import SwiGLU
from .layers.norm import RMSNorm

# Names of the projections that write into the residual stream; their init is scaled down with depth.
RESIDUAL_OUT = ("w_o", "o_proj", "out_proj", "w_down")


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int, tp: int = 1) -> nn.Module:
    if kind in cfg.memory_caching.mixers:  # Memory Caching around a linear-memory mixer (model/memory_caching.py)
        from .memory_caching import MemoryCaching

        return MemoryCaching(build_base_mixer(kind, cfg, layer_idx, tp), cfg.memory_caching, cfg.d_model, tp)
    return build_base_mixer(kind, cfg, layer_idx, tp)


def build_base_mixer(kind: str, cfg: ModelConfig, layer_idx: int, tp: int = 1) -> nn.Module:
    if kind == "gla":
        from .layers.gla import GatedLinearAttention

        return GatedLinearAttention(cfg.d_model, cfg.gla, layer_idx, cfg.norm_eps, tp)
    if kind == "gated_delta":
        from .layers.gated_delta import GatedDeltaNet

        return GatedDeltaNet(cfg.d_model, cfg.gated_delta, layer_idx, cfg.norm_eps, tp)
    if kind == "mom":
        from .layers.mom import MixtureOfMemories

        return MixtureOfMemories(cfg.d_model, cfg.mom, layer_idx, cfg.norm_eps, tp)
    if kind == "fm":
        from .layers.fm import FactorizationMemory

        return FactorizationMemory(cfg.d_model, cfg.fm, layer_idx, cfg.norm_eps, tp)
    if kind == "attention":
        from .layers.attention import Attention

        return Attention(cfg.d_model, cfg.attention, layer_idx, cfg.norm_eps, tp)
    if kind == "mamba2":
        from .layers.mamba2 import Mamba2

        return Mamba2(cfg.d_model, cfg.mamba2, layer_idx, cfg.norm_eps, tp)
    raise ValueError(f"unknown mixer '{kind}'")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: int = 1):
        super().__init__()
        self.kind = cfg.mixer_of_layer(layer_idx)
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(self.kind, cfg, layer_idx, tp)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_width, tp)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: dict | None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), doc_ids=doc_ids, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, vocab); at tensor_parallel > 1 this rank's vocabulary shard (padded / tp)
    loss: torch.Tensor | None = None  # language-model loss + auxiliary losses (what is optimised)
    lm_loss: torch.Tensor | None = None  # cross entropy alone (what is reported as the loss)
    aux_loss: torch.Tensor | None = None


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig | None = None):
        super().__init__()
        self.cfg = cfg
        parallel = parallel or ParallelConfig()
        self.tp = tp = parallel.tensor_parallel
        self.activation_checkpointing = parallel.activation_checkpointing
        if tp > 1:
            from fm_pretrain.parallel.state import require_tp

            require_tp(tp)
            # Initialisation: the full TP = 1 model from the same random stream, then each rank keeps its shard,
            # so TP = 2 starts exactly where TP = 1 does (it costs one full copy of the weights per rank, briefly).
            full = DecoderLM(cfg, ParallelConfig()).state_dict()
            rng = torch.get_rng_state()
        self.embed = vocab_embedding(cfg.vocab_size, cfg.d_model, tp)
        self.blocks = nn.ModuleList(Block(cfg, i, tp) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = vocab_head(cfg.d_model, cfg.vocab_size, tp)
        if tp == 1:
            self._init_all()
        else:
            from fm_pretrain.parallel.state import load_full_state_dict, tp_rank

            if cfg.tie_embeddings:
                self.lm_head.weight = self.embed.weight  # both split the (padded) vocabulary alike
            load_full_state_dict(self, full)
            torch.set_rng_state(rng)  # building the TP modules drew random numbers that a TP = 1 run does not
            # Padded vocabulary rows (on the last ranks) get -inf logits: the loss and sampling never see them.
            local = padded_vocab(cfg.vocab_size, tp) // tp
            ids = torch.arange(local) + tp_rank() * local
            self.register_buffer("vocab_pad_mask", ids >= cfg.vocab_size, persistent=False)

    def _init_all(self) -> None:
        self.apply(self._init_weights)
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in RESIDUAL_OUT:
                nn.init.normal_(module.weight, mean=0.0, std=out_std)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    @property
    def universal_checkpoint_info(self) -> dict | None:
        """How this model's TP shards split, saved with every checkpoint so training/reshard.py can merge or
        re-cut them for another TP size; None at TP = 1 (nothing is split)."""
        if self.tp == 1:
            return None
        from fm_pretrain.parallel.sharding import checkpoint_info

        return checkpoint_info(self, self.tp)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole model (at tp > 1: of the full model, not this rank's shards)."""
        n = sum(full_numel(p) for p in self.parameters())
        if exclude_embeddings:
            n -= full_numel(self.embed.weight)
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        caches: list[dict] | None = None,
    ) -> LMOutput:
        x = self.embed(input_ids)
        recompute = self.activation_checkpointing and self.training and caches is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = checkpoint(block, x, doc_ids, None, use_reentrant=False)
            else:
                x = block(x, doc_ids, None if caches is None else caches[i])
        logits = self.lm_head(self.final_norm(x))
        if self.tp > 1:
            logits = logits.masked_fill(self.vocab_pad_mask, float("-inf"))
        if labels is None:
            return LMOutput(logits=logits)
        if self.tp > 1:
            from fm_pretrain.parallel.megatron_layers import vocab_parallel_cross_entropy

            lm_loss = vocab_parallel_cross_entropy(logits, labels, IGNORE_INDEX)
        else:
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
        start: torch.Tensor | None = None,
        prefill_chunk: int | None = None,
    ) -> torch.Tensor:
        """Prompts input_ids (B, T), left-padded when start (B,) (each row's first real position) is given ->
        (B, T + n) with the n <= max_new_tokens generated tokens appended (greedy at temperature 0; after a row's
        eos, its eos repeated). Prefill with the parallel path (in chunks of prefill_chunk tokens if given), then
        one token at a time with per-layer caches. The full sampling options, stop strings and text handling are
        in `fm_pretrain.inference` (docs/inference.md), which this calls."""
        from fm_pretrain.inference import SamplingParams, generate_tokens

        out = generate_tokens(
            self, input_ids, max_new_tokens, start=start, sampling=SamplingParams(temperature=temperature),
            eos_id=eos_id, generator=generator, prefill_chunk=prefill_chunk,
        )  # fmt: skip
        return torch.cat([input_ids, out.tokens], dim=1)

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """All of the vocabulary's logits (gathered from the TP ranks, without padding)."""
        if self.tp == 1:
            return logits
        from fm_pretrain.parallel.megatron_layers import gather_last_dim

        return gather_last_dim(logits)[..., : self.cfg.vocab_size]
