"""`evaluate_model`: run tasks on an in-memory model and tokenizer (the CLI and training both call this)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .dp import Shard
from .items import Item, Loaded, SkipItem, Task, load_task, with_fewshot
from .metrics import NormUnit, char_f1, choice_scores, exact_match, first_line, numeric_match
from .scoring import Encoded, TokenizerLike, encode_pair, encode_prompt, generate, loglikelihoods
from .tasks import DEFAULT_DATA_DIR, resolve_tasks


@dataclass(frozen=True)
class Settings:
    num_fewshot: int = 0
    limit: int | None = None  # the first N items of each task
    batch_size: int = 8
    max_length: int = 2048  # tokens per scored sequence; longer contexts are cut from the left (and counted)
    seed: int = 1234  # few-shot example choice
    acc_norm_unit: NormUnit = "chars"
    max_new_tokens: int | None = None  # None: each task's own
    data_dir: str = str(DEFAULT_DATA_DIR)


@dataclass
class Tally:
    """Where every row of a task went: rows = scored + limited_out + sum(skipped)."""

    rows: int
    limited_out: int = 0
    scored: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    truncated_items: int = 0  # items with at least one sequence cut from the left
    truncated_tokens: int = 0
    boundary_merged: int = 0  # pairs whose joint tokenization merged across the context/continuation boundary

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def note(self, encs: Iterable[Encoded]) -> None:
        encs = list(encs)
        cut = sum(e.truncated for e in encs)
        self.truncated_items += int(cut > 0)
        self.truncated_tokens += cut
        self.boundary_merged += sum(e.merged for e in encs)

    def as_dict(self) -> dict[str, Any]:
        total = self.scored + self.limited_out + sum(self.skipped.values())
        if total != self.rows:  # a bug, never data: every row must be accounted for
            raise AssertionError(f"counts do not reconcile: {self.rows} rows, {total} accounted for ({self})")
        return {**asdict(self), "skipped": dict(sorted(self.skipped.items()))}


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _encode_items(items: list[Item], tok: TokenizerLike, s: Settings, tally: Tally) -> list[tuple[Item, list[Encoded]]]:
    kept = []
    for item in items:
        try:
            encs = [
                encode_pair(tok, c, x, s.max_length) for c, x in zip(item.contexts, item.continuations, strict=True)
            ]
        except SkipItem as e:
            tally.skip(str(e))
            continue
        tally.note(encs)
        kept.append((item, encs))
    return kept


def _score_loglikelihood(
    task: Task,
    items: list[Item],
    model: nn.Module,
    tok: TokenizerLike,
    s: Settings,
    tally: Tally,
    progress: bool,
    shard: Shard,
) -> dict[str, list[float]]:
    kept = _encode_items(items, tok, s, tally)
    flat = [e for _, encs in kept for e in encs]
    results = iter(loglikelihoods(model, flat, s.batch_size, tok.pad_id, task.name, progress, shard))
    per_metric: dict[str, list[float]] = {m: [] for m in task.metrics}
    for item, encs in kept:
        scored = [next(results) for _ in encs]
        if task.kind == "lastword":
            (logprob, greedy), = scored  # fmt: skip
            per_metric["acc"].append(float(greedy))
            per_metric["perplexity"].append(logprob)  # aggregated as exp(-mean)
        else:
            scores = choice_scores([lp for lp, _ in scored], item.continuations, item.gold, s.acc_norm_unit)
            for m in task.metrics:
                per_metric[m].append(scores[m])
    tally.scored = len(kept)
    return per_metric


def _score_generation(
    task: Task,
    items: list[Item],
    model: nn.Module,
    tok: TokenizerLike,
    s: Settings,
    tally: Tally,
    progress: bool,
    shard: Shard,
) -> dict[str, list[float]]:
    max_new = s.max_new_tokens or task.max_new_tokens
    kept, prompts = [], []
    for item in items:
        try:
            prompts.append(encode_prompt(tok, item.contexts[0], s.max_length, max_new))
        except SkipItem as e:
            tally.skip(str(e))
            continue
        tally.note(prompts[-1:])
        kept.append(item)
    outputs = generate(model, tok, prompts, max_new, s.batch_size, task.name, progress, shard)
    per_metric: dict[str, list[float]] = {m: [] for m in task.metrics}
    for item, text in zip(kept, outputs, strict=True):
        answer = first_line(text)
        if task.numeric:
            per_metric["exact_match"].append(numeric_match(answer, item.answers))
        else:
            per_metric["exact_match"].append(exact_match(answer, item.answers, task.lang))
            per_metric["char_f1"].append(char_f1(answer, item.answers, task.lang))
    tally.scored = len(kept)
    return per_metric


def evaluate_loaded(
    loaded: Loaded,
    model: nn.Module,
    tok: TokenizerLike,
    s: Settings,
    progress: bool = True,
    shard: Shard | None = None,
    per_item: bool = False,
) -> dict[str, Any]:
    """Metrics and the accounting of one loaded task (split over the ranks of `shard`, see eval/dp.py; every
    rank returns the same results). per_item: also each item's metric values, in item order (`per_item`)."""
    shard = shard or Shard()
    task, start = loaded.task, time.perf_counter()
    items = loaded.items if s.limit is None else loaded.items[: s.limit]
    tally = Tally(rows=loaded.rows, limited_out=len(loaded.items) - len(items), skipped=Counter(loaded.skipped))
    items = [with_fewshot(loaded, item, s.num_fewshot, s.seed) for item in items]
    score = _score_generation if task.kind == "generate" else _score_loglikelihood
    per_metric = score(task, items, model, tok, s, tally, progress, shard)
    metrics: dict[str, float | None] = {}
    for name, values in per_metric.items():
        if not values:
            metrics[name] = None
        elif name == "perplexity":
            metrics[name] = math.exp(-sum(values) / len(values))
        else:
            metrics[name], metrics[f"{name}_stderr"] = _mean_and_stderr(values)
    chance = sum(1 / len(i.contexts) for i in items) / len(items) if task.kind == "choice" and items else 0.0
    return {
        "lang": task.lang,
        "kind": task.kind,
        "primary": task.primary,
        "metrics": metrics,
        "chance": chance,
        "counts": tally.as_dict(),
        "fewshot_from": loaded.pool_from if s.num_fewshot else None,
        "seconds": round(time.perf_counter() - start, 3),
        **({"per_item": per_metric} if per_item else {}),
    }


def evaluate_model(
    model: nn.Module,
    tokenizer: TokenizerLike,
    tasks: str | Iterable[str] = "all",
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 1234,
    acc_norm_unit: NormUnit = "chars",
    max_new_tokens: int | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    per_item: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` (a DecoderLM at tensor_parallel = 1, on any device) on `tasks` (names or the groups
    en/ja/all); returns {"settings": ..., "tasks": {name: {metrics, chance, counts, ...}}}. The model is put in
    eval mode for the duration and handed back in the mode it came in.

    shard: split the items over data-parallel ranks (`eval.dp.data_parallel_shard()`; every rank of the group must
    call this with the same arguments and an identical model); each rank scores whole batches of the one-rank
    split, so per-item scores equal a one-rank run's, and every rank returns the full results. per_item: each
    task's results also hold `per_item` {metric: [value of each scored item]}."""
    if num_fewshot < 0 or (limit is not None and limit < 0) or batch_size < 1:
        raise ValueError(
            f"need num_fewshot >= 0, limit >= 0, batch_size >= 1; got {num_fewshot}, {limit}, {batch_size}"
        )
    cfg = getattr(model, "cfg", None)
    settings = Settings(
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        max_length=max_length or (cfg.max_seq_len if cfg is not None else Settings.max_length),
        seed=seed,
        acc_norm_unit=acc_norm_unit,
        max_new_tokens=max_new_tokens,
        data_dir=str(Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR),
    )
    selected = resolve_tasks(tasks)
    was_training = model.training
    model.eval()
    try:
        results = {}
        shard = shard or Shard()
        progress = progress and shard.rank == 0
        for task in tqdm(selected, desc="tasks", disable=not progress):
            loaded = load_task(task, Path(settings.data_dir))
            results[task.name] = evaluate_loaded(loaded, model, tokenizer, settings, progress, shard, per_item)
    finally:
        model.train(was_training)
    return {"settings": asdict(settings), "tasks": results}
