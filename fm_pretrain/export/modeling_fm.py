"""Hugging Face classes around our `DecoderLM`: `FMPretrainForCausalLM` and its recurrent-state `FMCache`.

The model is `DecoderLM` itself (fm_pretrain/model/lm.py) under the attribute `model`, so a state dict key is
`model.<our parameter name>`. Nothing of the model is re-implemented here: in an export this file and every module
it needs are generated from our sources (fm_pretrain/export/bundle.py), and in this package the same classes wrap
the package's own model.

Inputs and padding. Our mixers are causal and recurrent, so an `attention_mask` may only describe padding on the
left (generation: pad positions become identity steps of FM and Mamba-2 and masked keys of attention, as in
`fm_pretrain/model/cache.py`) or on the right (scoring: padding after the last real token changes nothing before
it). Any other mask (holes) is refused.

Generation. `FMCache` follows transformers 5's `Cache` API: one `FMCacheLayer` per block, each holding the dict
our layers read and write themselves (FM "state", Mamba-2 "conv" and "ssm", attention "k"/"v", the memory family's
states and conv windows, Memory Caching's "mc", plus "pos" and "start"). `generate()` then works as for any causal
LM (greedy, sampling, beam search through `reorder_cache`).
`forward` returns a cache only with `use_cache=True` (what `generate()` passes).

Kernels. Where `fm_kernels` (this project's kernel package) is importable, the FM and Mamba-2 layers choose their
backend as in training (`auto`: the Triton kernels on a GPU, `FM_PRETRAIN_KERNELS` overrides); without it they run
the chunked PyTorch paths exported with the model.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from fm_pretrain.config import from_dict
from fm_pretrain.model.lm import DecoderLM

from .configuration_fm import FMPretrainConfig


def fm_kernels_installed() -> bool:
    return importlib.util.find_spec("fm_kernels") is not None


class FMCacheLayer(CacheLayerMixin):
    """One block's generation state: the dict its mixer fills (see fm_pretrain/model/cache.py)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[str, Any] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        raise NotImplementedError("FM layers update their own state; FMCache has no key/value update")

    def get_seq_length(self) -> int:
        return int(self.state.get("pos", 0))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state.clear()

    def _map(self, fn) -> None:
        """fn on every per-row tensor of the state: plain tensors, and the fields of (nested) NamedTuples of them
        (Memory Caching's "mc" state); other entries ("pos") are the same for every row."""

        def apply(value):
            if torch.is_tensor(value):
                return fn(value)
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                return type(value)._make(apply(v) for v in value)
            return value

        for key, value in list(self.state.items()):
            self.state[key] = apply(value)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a recurrent state cannot drop tokens (FM and Mamba-2 keep no history)")

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass


class FMCache(Cache):
    """Generation state of an FM model: one `FMCacheLayer` per block."""

    def __init__(self, num_layers: int, start: torch.Tensor | None = None) -> None:
        super().__init__(layers=[FMCacheLayer() for _ in range(num_layers)])
        if start is not None:
            self.set_start(start)

    @property
    def states(self) -> list[dict[str, Any]]:
        """The per-layer dicts, as `DecoderLM.forward(caches=...)` takes them."""
        return [layer.state for layer in self.layers]

    def set_start(self, start: torch.Tensor) -> None:
        """Left padding: row b's first real token is at position start[b] (before anything was fed)."""
        if self.get_seq_length() != 0:
            raise ValueError("padding can only be set on an empty cache")
        if bool((start > 0).any()):
            for state in self.states:
                state["start"] = start.to(torch.long)


def padding_start(attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """(start (B,) of left padding or None, right_padded) for a 2D 0/1 mask; a mask with holes is refused."""
    mask = attention_mask.to(torch.bool)
    B, T = mask.shape
    pos = torch.arange(T, device=mask.device)[None, :]
    n_real = mask.sum(-1, keepdim=True)
    start = T - n_real
    if bool((mask == (pos >= start)).all()):
        return (start[:, 0] if bool((start > 0).any()) else None), False
    if bool((mask == (pos < n_real)).all()):
        return None, True
    raise ValueError(
        "attention_mask must be padding on the left or on the right (0s before or after each row's tokens); "
        "recurrent mixers cannot skip tokens in the middle of a sequence"
    )


class FMPretrainPreTrainedModel(PreTrainedModel):
    config_class = FMPretrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _is_stateful = True  # recurrent: no assisted decoding, no cache cropping
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: `DecoderLM` initialises itself (our scheme, docs/fm_layer.md); loading replaces every weight."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not create a DynamicCache: forward creates an FMCache


class FMPretrainForCausalLM(FMPretrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: FMPretrainConfig) -> None:
        super().__init__(config)
        cfg = from_dict({"model": config.model_config_dict()}, "config.json").model
        self.model = DecoderLM(cfg)
        if not fm_kernels_installed():  # only the exported PyTorch paths exist
            for module in self.model.modules():
                if hasattr(module, "backend") and module.backend is None:
                    module.backend = "torch"
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: FMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, vocab) (the last `logits_to_keep` positions if > 0). labels: the
        inputs themselves (shifted here, -100 ignored), as for every transformers causal LM."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("FMPretrainForCausalLM takes input_ids (inputs_embeds are not supported)")
        if past_key_values is not None and not isinstance(past_key_values, FMCache):
            raise TypeError(f"past_key_values must be an FMCache, got {type(past_key_values).__name__}")
        use_cache = bool(use_cache) or past_key_values is not None
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        start = None
        if attention_mask is not None and attention_mask.dim() == 2 and fresh:
            start, _ = padding_start(attention_mask[:, -input_ids.shape[1] :])
        if use_cache and past_key_values is None:
            past_key_values = FMCache(len(self.model.blocks))
        caches = None
        if past_key_values is not None:
            if start is not None:
                past_key_values.set_start(start)
            caches = past_key_values.states
        elif start is not None:  # left padding without a cache: a throwaway one carries the pad positions
            caches = FMCache(len(self.model.blocks), start).states
        logits = self.model(input_ids, caches=caches).logits
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: FMCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the tokens the cache has not consumed yet (the whole prompt first, then one token per step)."""
        if inputs_embeds is not None:
            raise ValueError("FMPretrainForCausalLM.generate takes input_ids (inputs_embeds are not supported)")
        seen = 0 if past_key_values is None else past_key_values.get_seq_length()
        return {
            "input_ids": input_ids[:, seen:],
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }


__all__ = ["FMCache", "FMCacheLayer", "FMPretrainForCausalLM", "FMPretrainPreTrainedModel", "padding_start"]
