"""Hugging Face transformers export (docs/export.md).

`python -m fm_pretrain.export --checkpoint RUN_DIR_or_STEP --out DIR` writes a directory that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads with only torch and transformers
installed; `python -m fm_pretrain.export --check DIR` compares its logits with the checkpoint's.

- `configuration_fm.py`, `modeling_fm.py`: the transformers classes (`FMPretrainConfig`, `FMPretrainForCausalLM`,
  the recurrent-state `FMCache`); exports carry copies generated from our sources by `bundle.py`;
- `tokenizer.py`: our sentencepiece model as a `tokenizers` pipeline (tokenizer.json), checked token for token;
- `convert.py`: `export_checkpoint`, `check_export`.

Importing this package registers `FMPretrainConfig` / `FMPretrainForCausalLM` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(DIR)` then needs no remote code (the package's own classes are used).
"""

from __future__ import annotations


def register_auto_classes() -> None:
    """Make transformers' Auto classes resolve model_type `fm_pretrain` to this package's classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_fm import FMPretrainConfig
    from .modeling_fm import FMPretrainForCausalLM

    AutoConfig.register(FMPretrainConfig.model_type, FMPretrainConfig, exist_ok=True)
    AutoModelForCausalLM.register(FMPretrainConfig, FMPretrainForCausalLM, exist_ok=True)
    AutoModel.register(FMPretrainConfig, FMPretrainForCausalLM, exist_ok=True)


register_auto_classes()

from .convert import EXPORTABLE_MIXERS, CheckFailed, ExportError, check_export, export_checkpoint  # noqa: E402

__all__ = ["EXPORTABLE_MIXERS", "CheckFailed", "ExportError", "check_export", "export_checkpoint"]
