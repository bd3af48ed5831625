"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, then greedy or a draw.

The order is the usual one (Hugging Face's): the repetition penalty acts on the raw logits, temperature divides
them, top-k then top-p remove tokens (their logits become -inf), and a token is drawn from the softmax of what
is left with a caller's `torch.Generator` (so a seed reproduces a run). Temperature 0 is greedy: the argmax
after the repetition penalty, ties to the lowest id (torch's argmax).

Each vectorised filter has a per-row loop beside it (`*_reference`) written from the definition; the tests
compare them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How `next_tokens` picks a token. temperature 0: greedy (top_k, top_p ignored); top_k None or 0: off;
    top_p None or 1.0: off; repetition_penalty 1.0: off (> 1 discourages every token already in the row's
    prompt or output, CTRL's rule: a positive logit is divided by it, a negative one multiplied)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool (token already in the row) -> penalised logits (B, V)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep each row's k largest logits (B, V); the rest become -inf. Ties at the k-th value are all kept."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter on logits (B, V): keep the smallest set of most probable tokens whose probability sums to
    at least p (the most probable token always); the rest become -inf."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    drop_sorted = before >= p  # already reached p without this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row: logits (B, V), seen (B, V) bool or None -> (B,) int64."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    logits = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- per-row references, written from the definitions (tests compare the vectorised filters with them) ---


def repetition_penalty_reference(logits: torch.Tensor, seen_ids: list[set[int]], penalty: float) -> torch.Tensor:
    out = logits.clone()
    for b, ids in enumerate(seen_ids):
        for i in ids:
            v = float(logits[b, i])
            out[b, i] = v / penalty if v > 0 else v * penalty
    return out


def top_k_reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    for b in range(logits.shape[0]):
        values = sorted(logits[b].tolist(), reverse=True)
        kth = values[min(k, len(values)) - 1]
        for i, v in enumerate(logits[b].tolist()):
            if v >= kth:
                out[b, i] = v
    return out


def top_p_reference(logits: torch.Tensor, p: float) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    for b in range(logits.shape[0]):
        probs = torch.softmax(logits[b].double(), dim=-1).tolist()
        ranked = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
        mass = 0.0
        for i in ranked:
            if mass >= p:
                break
            out[b, i] = logits[b, i]
            mass += probs[i]
    return out
