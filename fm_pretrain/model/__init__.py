"""Model library: token mixers (layers/), the decoder LM and its FLOP count."""

from .lm import DecoderLM, LMOutput

__all__ = ["DecoderLM", "LMOutput"]
