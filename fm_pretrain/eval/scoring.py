"""Model-side scoring: tokenizing (context, continuation) pairs, batched log-likelihoods, greedy generation.

Tokenization boundary. Our sentencepiece models add a dummy "▁" at the start of every encoded text, so encoding
the continuation on its own would insert a space that is not in the text. Instead `encode_pair` encodes
context + continuation in one go (the tokens the model saw in training for that text) and splits it where the
separately encoded context ends; trailing whitespace of the context is moved to the continuation first, so
" yes" stays one "▁yes" token. When a merge straddles the boundary (the joint encoding does not start with
the context's tokens), the split falls at their longest common prefix and the pair is counted as `merged`.

Padding. Every mixer (FM, Mamba-2, attention) is causal and left-to-right, so log-likelihood sequences are padded on
the right: the logits of real positions never see the padding. Generation pads on the left, with the pad positions
recorded in the caches (fm_pretrain.inference). A continuation of n tokens ending at position L is
scored from the logits at positions L-n-1 ... L-2, i.e. starting at the context's last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from fm_pretrain.inference.text import TokenizerLike, generate_text

from .dp import Shard
from .items import SkipItem


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
    shard: Shard | None = None,
) -> list[tuple[float, bool]]:
    """(sum of the continuation's token log-probabilities, whether every continuation token is the argmax),
    per sequence. Longest first, so each batch pads little; results come back in input order. With a `shard`
    (eval/dp.py) this rank scores its batches only and every rank gets all results."""
    _check_model(model)
    device = model_device(model)
    shard = shard or Shard()
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    out: dict[int, tuple[float, bool]] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = [b for j, b in enumerate(batches) if shard.owns(j)]
    for batch in tqdm(mine, desc=desc, disable=not progress, leave=False):
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
    merged = shard.merge(out)
    return [merged[i] for i in range(len(seqs))]


@torch.no_grad()
def generate(
    model: nn.Module,
    tok: TokenizerLike,
    prompts: Sequence[Encoded],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
    progress: bool = True,
    shard: Shard | None = None,
) -> list[str]:
    """Greedy continuation of each prompt up to the first newline or eos, through `fm_pretrain.inference`: prompts of
    any lengths share left-padded batches (longest first), and padding never reaches a real token, so each answer
    is what its prompt generates alone. With a `shard` this rank generates its batches only; all ranks get all."""
    _check_model(model)
    shard = shard or Shard()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = [b for j, b in enumerate(batches) if shard.owns(j)]
    out: dict[int, str] = {}
    for batch in tqdm(mine, desc=desc, disable=not progress, leave=False):
        outs = generate_text(
            model, tok, [prompts[i].ids for i in batch], max_new_tokens, stop_strings=["\n"], batch_size=len(batch)
        )
        out.update((i, o.text) for i, o in zip(batch, outs, strict=True))
    merged = shard.merge(out)
    return [merged[i] for i in range(len(prompts))]
