"""Inference: batched generation with recurrent states and KV caches, chunked prefill, sampling, text I/O
(docs/inference.md). The command line is `python -m fm_pretrain.generate --checkpoint RUN_DIR --prompt ...`."""

from .generation import (
    GenerationOutput,
    full_logits,
    generate_reference,
    generate_tokens,
    iter_prefill,
    left_pad,
    new_caches,
    prefill,
    repeat_caches,
)
from .sampling import GREEDY, SamplingParams, next_tokens
from .text import TextGeneration, cut_at_stop, generate_text

__all__ = [
    "GREEDY",
    "GenerationOutput",
    "SamplingParams",
    "TextGeneration",
    "cut_at_stop",
    "full_logits",
    "generate_reference",
    "generate_text",
    "generate_tokens",
    "iter_prefill",
    "left_pad",
    "new_caches",
    "next_tokens",
    "prefill",
    "repeat_caches",
]
