"""Batched generation with per-layer caches: left padding, (chunked) prefill, then one token at a time.

Prompts of different lengths are left-padded to the longest (`left_pad`), and each layer's cache records every
row's first real position ("start", see `fm_pretrain.model.cache`), so padding is an identity step of FM and
Mamba-2 and a masked key of attention: each row generates exactly what its prompt generates alone.

Prefill runs the parallel path, in one call or in chunks of C tokens (`prefill(..., chunk_size=C)`) that carry
the caches from chunk to chunk, so the activations of a prompt of any length take O(C) memory (plus attention's
KV cache, which grows with the prompt). Decoding then feeds one token per row per step.

Shapes: B rows, T padded prompt length, V vocabulary, n generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .sampling import GREEDY, SamplingParams, next_tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Token lists -> (input_ids (B, T) int64 left-padded with pad_id, start (B,) int64 first real position)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    start = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


def new_caches(model: nn.Module, start: torch.Tensor | None = None) -> list[dict]:
    """One empty cache dict per layer; with `start` (B,) the rows are left-padded (None or all 0: no padding)."""
    if start is not None and not bool((start > 0).any()):
        start = None
    return [{} if start is None else {"start": start} for _ in model.blocks]


def repeat_caches(caches: list[dict], n: int) -> list[dict]:
    """Independent copies of `caches` with every row repeated n times (B -> B n rows, row b at b n ... b n + n - 1):
    n continuations of the same prefilled prompts (parallel sampling; the decode benchmark's batches)."""
    return [
        {k: v.repeat_interleave(n, dim=0) if torch.is_tensor(v) else v for k, v in cache.items()} for cache in caches
    ]


def full_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The whole vocabulary's logits of a tensor-parallel model (gathered), as they are at tp = 1."""
    gather = getattr(model, "_full_logits", None)
    return logits if gather is None else gather(logits)


def iter_prefill(
    model: nn.Module, input_ids: torch.Tensor, caches: list[dict], chunk_size: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed input_ids (B, T) into `caches` in chunks of chunk_size tokens (None: all at once); yields
    (offset of the chunk, its logits (B, C, V)) after each chunk, so a caller can score them and let them go."""
    T = input_ids.shape[1]
    C = T if chunk_size is None else chunk_size
    if C < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for s in range(0, T, C):
        yield s, model(input_ids[:, s : s + C], caches=caches).logits


def prefill(
    model: nn.Module, input_ids: torch.Tensor, caches: list[dict], chunk_size: int | None = None
) -> torch.Tensor:
    """Run the prompt input_ids (B, T) into `caches`; returns the logits of its last position (B, V)."""
    last = None
    for _, logits in iter_prefill(model, input_ids, caches, chunk_size):
        last = logits[:, -1]
    return full_logits(model, last)


@dataclass
class GenerationOutput:
    """tokens (B, n): the generated tokens (after a finished row's last token: its final token repeated, never
    read); lengths (B,): how many of them each row keeps (eos and stop tokens excluded); finish: per row
    "eos", "stop" (the caller's `stop` said so) or "length"."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    finish: list[str]

    def row(self, b: int) -> list[int]:
        return self.tokens[b, : int(self.lengths[b])].tolist()


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    start: torch.Tensor | None = None,
    sampling: SamplingParams = GREEDY,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk: int | None = None,
    stop: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> GenerationOutput:
    """Generate up to max_new_tokens per row after the left-padded prompts input_ids (B, T) (start (B,): first
    real position of each row, None: no padding).

    Rows stop at eos (not kept) or when `stop(tokens (B, i), done (B,)) -> (B,) bool` says so (the tokens kept
    are then decided by the caller, e.g. a stop string cut from the text); the loop ends when every row is done.
    `on_step(new (B,), done (B,))` sees each step's tokens (for streaming). Rows are independent: a row's tokens
    do not depend on the others' (with sampling, on the shared generator's draws only)."""
    B, T = input_ids.shape
    device = input_ids.device
    caches = new_caches(model, start)
    logits = prefill(model, input_ids, caches, prefill_chunk)
    seen = None
    if sampling.repetition_penalty != 1.0:
        V = logits.shape[-1]
        index = input_ids.clone()
        if start is not None:  # pads go to an extra column that is dropped
            index.masked_fill_(torch.arange(T, device=device)[None, :] < start[:, None], V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device).scatter_(1, index, True)[:, :V]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    finish = ["length"] * B
    out: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        nxt = next_tokens(logits, sampling, seen, generator)
        if out:  # finished rows repeat their last token (never read)
            nxt = torch.where(done, out[-1], nxt)
        out.append(nxt)
        live = ~done
        is_eos = live & (nxt == eos_id) if eos_id is not None else torch.zeros_like(done)
        lengths += (live & ~is_eos).long()
        newly = is_eos
        if stop is not None:
            newly = newly | (live & ~is_eos & stop(torch.stack(out, 1), done))
        for b in newly.nonzero().flatten().tolist():
            finish[b] = "eos" if bool(is_eos[b]) else "stop"
        done = done | newly
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        if on_step is not None:
            on_step(nxt, done)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = full_logits(model, model(nxt[:, None], caches=caches).logits[:, -1])
    tokens = torch.stack(out, 1) if out else input_ids.new_zeros(B, 0)
    return GenerationOutput(tokens=tokens, lengths=lengths, finish=finish)


@torch.no_grad()
def generate_reference(
    model: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingParams = GREEDY,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The slow twin of `generate_tokens` for one unpadded prompt: no cache, one full forward of the whole
    sequence per new token, the seen-token set rebuilt from the list each step. Returns the generated ids,
    eos excluded (the tests compare it with the batched, padded, cached path)."""
    device = next(model.parameters()).device
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = full_logits(model, model(torch.tensor([ids], device=device)).logits[:, -1])
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, sorted(set(ids))] = True
        nxt = int(next_tokens(logits, sampling, seen, generator)[0])
        if nxt == eos_id:
            break
        ids.append(nxt)
        out.append(nxt)
    return out
