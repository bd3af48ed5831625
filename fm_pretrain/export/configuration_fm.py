"""`FMPretrainConfig`: the Hugging Face configuration of an fm-pretrain decoder (model_type `fm_pretrain`).

`fm_model` holds our whole model section as trained (`fm_pretrain.config.ModelConfig` as a dict: `layer_pattern`,
`fm`, `attention`, `mamba2`, ...), so the export rebuilds exactly the checkpoint's model whatever sections the
config grows. The usual transformers fields (`vocab_size`, `hidden_size`, `num_hidden_layers`,
`max_position_embeddings`, `tie_word_embeddings`) are derived from it, for tools that read them (lm-evaluation-
harness takes its context length from `max_position_embeddings`). This file is copied as it is into every export.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class FMPretrainConfig(PretrainedConfig):
    model_type = "fm_pretrain"
    keys_to_ignore_at_inference = ["past_key_values"]

    fm_model: dict | None = None
    vocab_size: int = 8000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.fm_model:
            m = self.fm_model
            self.vocab_size = int(m["vocab_size"])
            self.hidden_size = int(m["d_model"])
            self.num_hidden_layers = int(m["n_layers"])
            self.max_position_embeddings = int(m["max_seq_len"])
            self.tie_word_embeddings = bool(m.get("tie_embeddings", False))
        super().__post_init__(**kwargs)

    def model_config_dict(self) -> dict[str, Any]:
        """Our model section (`fm_pretrain.config.from_dict({"model": ...}).model` rebuilds the ModelConfig)."""
        if not self.fm_model:
            raise ValueError("config.json has no fm_model section: not an fm-pretrain export")
        return dict(self.fm_model)

    @classmethod
    def from_model_config(cls, model: dict[str, Any], **kwargs: Any) -> FMPretrainConfig:
        """From our model section (`to_dict(cfg)["model"]`); kwargs: token ids, ..."""
        return cls(fm_model=dict(model), **kwargs)


__all__ = ["FMPretrainConfig"]
