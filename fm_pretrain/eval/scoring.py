"""Model-side scoring: tokenizing (context, continuation) pairs, batched log-likelihoods, greedy generation.

Tokenization boundary. Our sentencepiece models add a dummy "▁" at the start of every encoded text, so encoding
the continuation on its own would insert a space that is not in the text. Instead `encode_pair` encodes
context + continuation in one go (the tokens the model saw in training for that text) and splits it where the
separately encoded context ends; trailing whitespace of the context is moved to the continuation first, so
" yes" stays one "▁yes" token. When a merge straddles the boundary (the joint encoding does not start with
the context's tokens), the split falls at their longest common prefix and the pair is counted as `merged`.

Padding. Every mixer (FM, Mamba-2, attention) is causal and left-to-right, so sequences are padded on the
right: the logits of real positions never see the padding. A continuation of n tokens ending at position L is
scored from the logits at positions L-n-1 ... L-2, i.e. starting at the context's last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .items import SkipItem


class TokenizerLike(Protocol):
    """What evaluation needs of a tokenizer (fm_pretrain.data.tokenizer.Tokenizer has it)."""

    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # [bos] + context + continuation tokens, cut from the left to the model's max length
    n_cont: int  # the last n_cont ids are the scored continuation
    truncated: int  # tokens cut from the left
    merged: bool  # a token straddled the context/continuation boundary


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tok: TokenizerLike, context: str, continuation: str, max_length: int) -> Encoded:
    """Token ids of one (context, continuation) pair with the split point (see the module docstring)."""
    stripped = context.rstrip()
    continuation, context = context[len(stripped) :] + continuation, stripped
    full = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    split = _common_prefix(ctx, full)
    n_cont = len(full) - split
    if n_cont <= 0:
        raise SkipItem("continuation adds no tokens")
    if n_cont >= max_length:
        raise SkipItem("continuation longer than the max length")
    ids = [tok.bos_id, *full]
    cut = max(0, len(ids) - max_length)
    return Encoded(ids[cut:], n_cont, cut, split < len(ctx))


def encode_prompt(tok: TokenizerLike, prompt: str, max_length: int, max_new_tokens: int) -> Encoded:
    """[bos] + prompt, cut from the left so that the prompt and the generated tokens fit in max_length."""
    room = max_length - max_new_tokens
    if room < 2:
        raise SkipItem("max new tokens leave no room for the prompt")
    ids = [tok.bos_id, *tok.encode(prompt)]
    cut = max(0, len(ids) - room)
    return Encoded(ids[cut:], 0, cut, False)


def _check_model(model: nn.Module) -> None:
    if getattr(model, "tp", 1) != 1:
        raise ValueError("evaluation needs a tensor_parallel = 1 model (the CLI rebuilds one from any checkpoint)")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    seqs: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    desc: str = "loglikelihood",
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of the continuation's token log-probabilities, whether every continuation token is the argmax),
    per sequence. Longest first, so each batch pads little; results come back in input order."""
    _check_model(model)
    device = model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = len(seqs[batch[0]].ids)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(seqs[i].ids)] = torch.tensor(seqs[i].ids)
        logits = model(input_ids.to(device)).logits
        for row, i in enumerate(batch):
            s = seqs[i]
            end = len(s.ids)
            # Only the continuation's positions are normalised: (n_cont, vocab), in fp32 whatever the model's dtype.
            rows = logits[row, end - s.n_cont - 1 : end - 1]
            logp = torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
            target = torch.tensor(s.ids[end - s.n_cont :], device=logp.device)
            lp = logp.gather(-1, target[:, None]).sum().item()
            out[i] = (lp, bool((logp.argmax(-1) == target).all()))
    return out


def newline_id(tok: TokenizerLike) -> int | None:
    """The id of a token that is exactly a newline, if the vocabulary has one (ours does)."""
    for i in tok.encode("\n"):
        if tok.decode([i]) == "\n":
            return i
    return None


@torch.no_grad()
def generate(
    model: nn.Module,
    tok: TokenizerLike,
    prompts: Sequence[Encoded],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy continuation of each prompt with `DecoderLM.generate` (its cached, recurrent decode path), up to the
    first newline or eos. Prompts of equal length share a batch: the decode caches take no padding mask."""
    _check_model(model)
    device = model_device(model)
    stop = newline_id(tok)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.ids), []).append(i)
    batches = [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]
    out = [""] * len(prompts)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        input_ids = torch.tensor([prompts[i].ids for i in batch], dtype=torch.long, device=device)
        # Early exit once every row has produced a newline (or eos when the vocabulary has no newline token).
        gen = model.generate(input_ids, max_new_tokens, eos_id=stop if stop is not None else tok.eos_id)
        for row, i in enumerate(batch):
            new = gen[row, input_ids.shape[1] :].tolist()
            if tok.eos_id in new:
                new = new[: new.index(tok.eos_id)]
            out[i] = tok.decode(new)
    return out
