"""Model library: token mixers (layers/), the decoder LM and its FLOP count."""

from .lm import IGNORE_INDEX, DecoderLM, LMOutput

__all__ = ["IGNORE_INDEX", "DecoderLM", "LMOutput"]
