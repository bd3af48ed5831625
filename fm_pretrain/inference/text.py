"""Text in, text out: tokenize prompts, generate in left-padded batches, stop at eos or a stop string, stream.

`generate_text(model, tokenizer, ["prompt", ...], max_new_tokens=64, sampling=SamplingParams(...),
stop_strings=["\\n"], seed=0)` returns one `TextGeneration` per prompt, in the input order. Prompts are
batched longest first (little padding); a row's output does not depend on its batch under greedy decoding
(the padded batch equals each prompt alone). Under sampling the draws come from one seeded generator shared by
the batch, so a run is reproducible for the same prompts, batch size and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .generation import generate_tokens, left_pad
from .sampling import GREEDY, SamplingParams


class TokenizerLike(Protocol):
    """What generation and evaluation need of a tokenizer (fm_pretrain.data.tokenizer.Tokenizer has it)."""

    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class TextGeneration:
    """One prompt's result: `text` (cut before the first stop string), its token ids (eos excluded; with a stop
    string, every token generated up to and including the one that completed it) and why it ended:
    "eos", "stop" (a stop string) or "length" (max_new_tokens)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish: str


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """text up to the earliest occurrence of any stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer: TokenizerLike,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingParams = GREEDY,
    stop_strings: Sequence[str] = (),
    stop_at_eos: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 8,
    prefill_chunk: int | None = None,
    add_bos: bool = True,
    stream: Callable[[int, str], None] | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[TextGeneration]:
    """Generate a continuation of each prompt (a string, tokenized with bos first when add_bos; or token ids as
    given). `stream(prompt index, new text)` receives text as it is produced (the stable part of the decoding,
    never beyond a stop string). `seed` seeds a torch.Generator on the model's device unless one is passed."""
    if batch_size < 1 or max_new_tokens < 0:
        raise ValueError(f"need batch_size >= 1 and max_new_tokens >= 0, got {batch_size}, {max_new_tokens}")
    device = model_device(model)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = [
        ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(p) if isinstance(p, str) else list(p)
        for p in prompts
    ]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    results: list[TextGeneration | None] = [None] * len(ids)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        input_ids, start = left_pad([ids[i] for i in batch], tokenizer.pad_id, device)

        def stop(tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
            hit = torch.zeros_like(done)
            for r in (~done).nonzero().flatten().tolist():
                hit[r] = cut_at_stop(tokenizer.decode(tokens[r].tolist()), stop_strings)[1]
            return hit

        streamer = None if stream is None else _Streamer(tokenizer, batch, stop_strings, stop_at_eos, stream)
        out = generate_tokens(
            model, input_ids, max_new_tokens, start=start, sampling=sampling,
            eos_id=tokenizer.eos_id if stop_at_eos else None, generator=generator, prefill_chunk=prefill_chunk,
            stop=stop if stop_strings else None, on_step=streamer,
        )  # fmt: skip
        for r, i in enumerate(batch):
            tokens = out.row(r)
            text, _ = cut_at_stop(tokenizer.decode(tokens), stop_strings)
            results[i] = TextGeneration(prompt_ids=ids[i], token_ids=tokens, text=text, finish=out.finish[r])
            if streamer is not None:
                streamer.flush(r, text)
    return results  # type: ignore[return-value]


class _Streamer:
    """`on_step` of one batch: decodes each live row's tokens so far and hands `stream` the new stable text."""

    def __init__(self, tokenizer: TokenizerLike, batch: list[int], stop_strings: Sequence[str], stop_at_eos: bool,
                 stream: Callable[[int, str], None]) -> None:  # fmt: skip
        self.tok, self.batch, self.stream = tokenizer, batch, stream
        self.stop_strings, self.stop_at_eos = stop_strings, stop_at_eos
        self.tokens: list[torch.Tensor] = []
        self.printed = [""] * len(batch)
        self.finished = [False] * len(batch)

    def __call__(self, new: torch.Tensor, done: torch.Tensor) -> None:
        self.tokens.append(new)
        sofar = torch.stack(self.tokens, 1).tolist()
        for r, i in enumerate(self.batch):
            if self.finished[r]:
                continue
            keep = sofar[r]
            if self.stop_at_eos and keep[-1] == self.tok.eos_id:
                keep = keep[:-1]
            text, _ = cut_at_stop(self.tok.decode(keep), self.stop_strings)
            self.finished[r] = bool(done[r])
            if not text.startswith(self.printed[r]) or (text.endswith("\ufffd") and not self.finished[r]):
                continue  # an unfinished multi-byte character: wait for the next token
            if len(text) > len(self.printed[r]):
                self.stream(i, text[len(self.printed[r]) :])
                self.printed[r] = text

    def flush(self, r: int, text: str) -> None:
        """Hand out the rest of row r's final text (e.g. a character left unfinished at max_new_tokens)."""
        if text.startswith(self.printed[r]) and len(text) > len(self.printed[r]):
            self.stream(self.batch[r], text[len(self.printed[r]) :])
        self.printed[r] = text
