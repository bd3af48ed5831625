"""The common request shape every benchmark is turned into, task descriptions, loading and few-shot prompts.

Three kinds of item:
- `choice`: score each (context, continuation) pair by log-likelihood, the highest wins (acc, acc_norm). Plain
  multiple choice repeats one context; "partial" scoring (WinoGrande, XWinograd) has one context per option and
  a shared continuation, so only acc is meaningful.
- `lastword`: one (context, target) pair; greedy-match accuracy and perplexity (LAMBADA).
- `generate`: greedy generation from the context, compared with `answers` (exact match, char F1, numbers).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .readers import EvalDataError, Record

Kind = Literal["choice", "lastword", "generate"]
FEWSHOT_SEPARATOR = "\n\n"


class SkipItem(Exception):
    """Raised by an item builder for a well-formed row that cannot be scored; the message is the reason."""


@dataclass(frozen=True)
class Item:
    id: str  # unique within the task and split
    where: str  # file:line (or key path) of the source row
    contexts: tuple[str, ...]  # choice: one per choice; lastword / generate: one prompt
    continuations: tuple[str, ...] = ()  # choice: one per choice; lastword: (target,); generate: ()
    gold: int = 0  # choice: index of the correct pair
    answers: tuple[str, ...] = ()  # generate: accepted answers (the first is used in demonstrations)
    answer_prefix: str = ""  # generate: text between the prompt and the answer in a demonstration (" " in English)

    def demonstration(self) -> str:
        """This item solved, as one few-shot example."""
        if self.continuations:
            return self.contexts[self.gold] + self.continuations[self.gold]
        return self.contexts[0] + self.answer_prefix + self.answers[0]

    def with_prefix(self, prefix: str) -> Item:
        return Item(self.id, self.where, tuple(prefix + c for c in self.contexts), self.continuations, self.gold,
                    self.answers, self.answer_prefix)  # fmt: skip


Builder = Callable[[Record], Item]
Reader = Callable[[Path], Iterator[Record]]
Splitter = Callable[[Record], str]  # "eval" or "fewshot": both splits in one file (XWinograd)


@dataclass(frozen=True)
class Task:
    name: str
    lang: Literal["en", "ja"]
    kind: Kind
    path: str  # eval split, relative to the data directory (laid out like shared/data/eval)
    read: Reader
    build: Builder
    fewshot_path: str | None = None  # a train split for few-shot examples; None: the eval file itself
    split: Splitter | None = None  # rows of `path` that belong to the few-shot pool instead of the eval split
    partial: bool = False  # choice: one context per option, shared continuation (acc only)
    numeric: bool = False  # generate: compare the last number of the output (MGSM)
    max_new_tokens: int = 32
    primary: str = "acc"  # the metric plotted and shown first

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.kind == "choice":
            return ("acc",) if self.partial else ("acc", "acc_norm")
        if self.kind == "lastword":
            return ("acc", "perplexity")
        return ("exact_match",) if self.numeric else ("exact_match", "char_f1")


@dataclass
class Loaded:
    """A task's items with the accounting of every row read: rows = len(items) + sum(skipped.values())."""

    task: Task
    items: list[Item]
    rows: int
    skipped: Counter[str] = field(default_factory=Counter)
    pool: list[Item] = field(default_factory=list)  # few-shot candidates
    pool_from: str = "the eval split itself"
    same_split: bool = True  # pool is the eval split: exclude the item from its own examples


def _build_all(task: Task, records: Iterator[Record]) -> tuple[list[Item], list[Item], int, Counter[str]]:
    """(eval items, few-shot items from the same file, eval rows read, skipped eval rows by reason)."""
    items, pool, rows, skipped = [], [], 0, Counter[str]()
    seen: dict[str, str] = {}
    for rec in records:
        split = task.split(rec) if task.split else "eval"
        try:
            item = task.build(rec)
        except SkipItem as e:
            if split == "eval":
                rows += 1
                skipped[str(e)] += 1
            continue
        if split != "eval":
            pool.append(item)
            continue
        rows += 1
        if item.id in seen:
            raise EvalDataError(f"{rec.where}: duplicate id '{item.id}' (first at {seen[item.id]})")
        seen[item.id] = rec.where
        items.append(item)
    return items, pool, rows, skipped


def load_task(task: Task, data_dir: Path) -> Loaded:
    """Read and build a task's eval split and its few-shot pool from `data_dir`."""
    items, pool, rows, skipped = _build_all(task, task.read(data_dir / task.path))
    loaded = Loaded(task, items, rows, skipped)
    if task.fewshot_path is not None:
        loaded.pool, _, _, _ = _build_all(task, task.read(data_dir / task.fewshot_path))
        loaded.pool_from, loaded.same_split = task.fewshot_path, False
    elif task.split is not None:
        loaded.pool, loaded.pool_from, loaded.same_split = pool, f"{task.path} (train rows)", False
    else:
        loaded.pool = list(items)
    return loaded


def _seed_for(seed: int, task: str, item_id: str) -> int:
    """A stable per-item seed: an item's examples do not depend on --limit, batch order or PYTHONHASHSEED."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def fewshot_examples(loaded: Loaded, item: Item, k: int, seed: int) -> list[Item]:
    """k examples for `item`, drawn without replacement from the pool (never the item itself)."""
    if k <= 0:
        return []
    candidates = [p for p in loaded.pool if p.id != item.id] if loaded.same_split else loaded.pool
    if len(candidates) < k:
        raise ValueError(
            f"{loaded.task.name}: {k} few-shot examples asked, but only {len(candidates)} are available from "
            f"{loaded.pool_from}"
        )
    return random.Random(_seed_for(seed, loaded.task.name, item.id)).sample(candidates, k)


def with_fewshot(loaded: Loaded, item: Item, k: int, seed: int) -> Item:
    """The item with k solved examples before each of its contexts, separated by blank lines."""
    shots = fewshot_examples(loaded, item, k, seed)
    if not shots:
        return item
    return item.with_prefix("".join(s.demonstration() + FEWSHOT_SEPARATOR for s in shots))
