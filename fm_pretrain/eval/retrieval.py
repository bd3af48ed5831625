"""Retrieval in long contexts: passkey and needle-in-a-haystack prompts, accuracy over length x depth, a heatmap.

`python -m fm_pretrain.eval.retrieval --checkpoint RUN_DIR [--lengths 1024,4096,16384] [--depths 0,0.25,0.5,0.75,1]`

A trial is one prompt of exactly `length` tokens: `[bos] + intro + filler[:b] + needle + filler[b:] + question`,
built from separately encoded pieces, where the needle states a random number of `n_digits` digits and the
question asks for it. The insertion point b is the filler-unit boundary nearest to depth x (filler tokens), so
depth 0 puts the needle right after the intro and depth 1 right before the question. The filler is cut to the
exact number of tokens the length leaves (`RetrievalTrial.needle_start/end` give where the needle landed).

Tasks:
- `passkey` (English): the classic synthetic filler, a few plain sentences repeated, and "The pass key is N";
- `needle_en`, `needle_ja`: natural filler, lines of the English / Japanese corpus (`../shared/data/corpus` when
  present, else the bundled `data/tiny`; skipped with a message when neither is there), starting at a seeded
  random line per trial, and a "special magic number" needle in the filler's language.

Scoring: the model generates n_digits + 4 tokens greedily (`fm_pretrain.inference`, prompts of one length share
a batch); a trial is correct when the first run of digits in the output is the number. Chance is 10^-n_digits
(every digit string is equally likely). `score(trials, predictions)` takes any predictions, so a perfect reader
scores 1 and a constant answer scores the share of trials whose number it happens to be.

Outputs: `retrieval.json` and one heatmap per task (`retrieval_<task>.png`: depth x length, accuracy in each cell)
in `STEP_DIR/retrieval/`; MLflow metrics `retrieval/<task>/acc` (all trials), `retrieval/<task>/acc/<length>`
and `retrieval/<task>/acc/<length>/<depth>` at the checkpoint's step, files under `retrieval/step_<N>/`.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

RESULTS_FILE = "retrieval.json"
METRIC_PREFIX = "retrieval"


@dataclass(frozen=True)
class Template:
    intro: str
    needle: str  # with {key}
    question: str


PASSKEY = Template(
    intro="A number is hidden somewhere in the long text below. Read everything, find the number and keep it in mind: "
    "you will be asked for it at the end.",
    needle="The pass key is {key}. Remember it: {key} is the pass key.",
    question="What is the pass key? The pass key is",
)
PASSKEY_FILLER = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
]
NEEDLE = {
    "en": Template(
        intro="Read the following text and answer the question at the end.",
        needle="The special magic number is {key}.",
        question="What is the special magic number mentioned in the text? The special magic number is",
    ),
    "ja": Template(
        intro="次の文章を読んで、最後の質問に答えてください。",
        needle="特別なマジックナンバーは{key}です。",
        question="文章の中に書かれている特別なマジックナンバーは何ですか？特別なマジックナンバーは",
    ),
}
TASKS = ("passkey", "needle_en", "needle_ja")


@dataclass(frozen=True)
class RetrievalTrial:
    """One prompt: ids has exactly `length` tokens; the needle's tokens are ids[needle_start:needle_end]."""

    task: str
    length: int
    depth: float
    answer: str
    ids: list[int]
    needle_start: int
    needle_end: int


def filler_units(task: str, tok, corpus_dir: Path | None = None) -> list[list[int]] | None:
    """The filler of a task as encoded units (sentences or lines); None when its corpus is absent."""
    if task == "passkey":
        return [tok.encode(s) for s in PASSKEY_FILLER]
    lang = task.rsplit("_", 1)[1]
    path = corpus_file(lang, corpus_dir)
    if path is None:
        return None
    from fm_pretrain.data.readers import iter_documents

    lines = [line.strip() for _, text in iter_documents(path) for line in text.splitlines() if line.strip()]
    return [tok.encode(line) for line in lines[:20000]]


def corpus_file(lang: str, corpus_dir: Path | None) -> Path | None:
    """The natural filler of `lang`: corpus_dir's file, else the shared corpus, else the bundled tiny slice."""
    from .long_context import SHARED_CORPUS, TINY_CORPUS

    names = {"en": ("en_wikipedia.jsonl", "tiny_en.jsonl"), "ja": ("ja_docs.jsonl", "tiny_ja.jsonl")}[lang]
    dirs = [corpus_dir] if corpus_dir is not None else [SHARED_CORPUS, TINY_CORPUS]
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def make_trial(
    task: str, tok, units: Sequence[Sequence[int]], length: int, depth: float, key: str, unit_offset: int = 0
) -> RetrievalTrial:
    """The prompt of one trial (module docstring); filler units are used cyclically from `unit_offset`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    t = PASSKEY if task == "passkey" else NEEDLE[task.rsplit("_", 1)[1]]
    prefix = [tok.bos_id, *tok.encode(t.intro)]
    needle, question = tok.encode(t.needle.format(key=key)), tok.encode(t.question)
    n_fill = length - len(prefix) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"{task}: length {length} is shorter than the prompt without filler ({length - n_fill})")
    fill: list[int] = []
    bounds = [0]  # unit boundaries inside the filler
    i = unit_offset
    while len(fill) < n_fill:
        fill += units[i % len(units)]
        bounds.append(min(len(fill), n_fill))
        i += 1
    fill = fill[:n_fill]
    b = min(bounds, key=lambda x: (abs(x - depth * n_fill), x))
    ids = prefix + fill[:b] + needle + fill[b:] + question
    start = len(prefix) + b
    return RetrievalTrial(task, length, depth, key, ids, start, start + len(needle))


def make_trials(
    task: str,
    tok,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_trials: int,
    n_digits: int = 5,
    seed: int = 0,
    corpus_dir: Path | None = None,
) -> list[RetrievalTrial]:
    """n_trials trials per (length, depth) cell, with seeded random numbers (and filler starting points)."""
    units = filler_units(task, tok, corpus_dir)
    if units is None:
        return []
    rng = random.Random(f"{seed}/{task}")
    trials = []
    for length in lengths:
        for depth in depths:
            for _ in range(n_trials):
                key = "".join(rng.choice("0123456789") for _ in range(n_digits))
                offset = rng.randrange(len(units)) if task != "passkey" else 0
                trials.append(make_trial(task, tok, units, length, depth, key, offset))
    return trials


FIRST_NUMBER = re.compile(r"\d+")


def score(trials: Sequence[RetrievalTrial], predictions: Sequence[str]) -> list[bool]:
    """Whether the first run of digits of each prediction is the trial's number (NFKC: full-width digits count)."""
    import unicodedata

    out = []
    for t, text in zip(trials, predictions, strict=True):
        m = FIRST_NUMBER.search(unicodedata.normalize("NFKC", text))
        out.append(m is not None and m.group(0) == t.answer)
    return out


Predictor = Callable[[Sequence[RetrievalTrial]], list[str]]


def model_predictor(
    model: nn.Module, tok, batch_size: int = 8, prefill_chunk: int | None = None, progress: bool = False
) -> Predictor:
    """Greedy generation of n_digits + 4 tokens after each prompt, batched (`fm_pretrain.inference`)."""
    from fm_pretrain.inference import generate_text

    def predict(trials: Sequence[RetrievalTrial]) -> list[str]:
        if not trials:
            return []
        n_new = max(len(t.answer) for t in trials) + 4
        outs = generate_text(
            model, tok, [t.ids for t in trials], n_new, batch_size=batch_size, prefill_chunk=prefill_chunk,
            stop_strings=["\n"], progress=progress, desc="retrieval",
        )  # fmt: skip
        return [o.text for o in outs]

    return predict


def accuracy_grid(trials: Sequence[RetrievalTrial], correct: Sequence[bool]) -> dict[str, Any]:
    """{"lengths", "depths", "acc": [[acc of (depth i, length j)]], "n": trials per cell, "overall"}."""
    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    cells: dict[tuple[int, float], list[bool]] = {}
    for t, c in zip(trials, correct, strict=True):
        cells.setdefault((t.length, t.depth), []).append(c)
    acc = [[sum(cells[(L, d)]) / len(cells[(L, d)]) if (L, d) in cells else None for L in lengths] for d in depths]
    return {
        "lengths": lengths,
        "depths": depths,
        "acc": acc,
        "n": max((len(v) for v in cells.values()), default=0),
        "overall": sum(correct) / len(correct) if correct else None,
    }


def evaluate_retrieval(
    predict: Predictor,
    tok,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (1024, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n_trials: int = 5,
    n_digits: int = 5,
    seed: int = 0,
    corpus_dir: Path | None = None,
) -> dict[str, Any]:
    """Build each task's trials, predict, score: {"settings", "tasks": {task: grid + chance}, "skipped": {...}}."""
    settings = {"tasks": list(tasks), "lengths": list(lengths), "depths": list(depths), "n_trials": n_trials,
                "n_digits": n_digits, "seed": seed}  # fmt: skip
    results: dict[str, Any] = {"settings": settings, "tasks": {}, "skipped": {}}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown retrieval task {task!r} (choose from {', '.join(TASKS)})")
        trials = make_trials(task, tok, lengths, depths, n_trials, n_digits, seed, corpus_dir)
        if not trials:
            msg = f"no {task.rsplit('_', 1)[1]} corpus found (../shared/data/corpus or data/tiny); skipped"
            log.warning("%s: %s", task, msg)
            results["skipped"][task] = msg
            continue
        preds = predict(trials)
        correct = score(trials, preds)
        grid = accuracy_grid(trials, correct)
        results["tasks"][task] = {**grid, "chance": 10.0**-n_digits, "examples": [
            {"length": t.length, "depth": t.depth, "answer": t.answer, "prediction": p}
            for t, p in list(zip(trials, preds, strict=True))[:: max(1, len(trials) // 10)]
        ]}  # fmt: skip
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for task, res in results["tasks"].items():
        out[f"{METRIC_PREFIX}/{task}/acc"] = res["overall"]
        for j, L in enumerate(res["lengths"]):
            col = [row[j] for row in res["acc"] if row[j] is not None]
            out[f"{METRIC_PREFIX}/{task}/acc/{L}"] = sum(col) / len(col)
            for i, d in enumerate(res["depths"]):
                if res["acc"][i][j] is not None:
                    out[f"{METRIC_PREFIX}/{task}/acc/{L}/{d:g}"] = res["acc"][i][j]
    return out


def plot_heatmap(grid: dict[str, Any], out: Path, title: str) -> Path:
    """Accuracy per (depth, length) cell, 0 red to 1 green, the value written in each cell."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc = [[float("nan") if v is None else v for v in row] for row in grid["acc"]]
    fig = Figure(figsize=(1.2 * len(grid["lengths"]) + 2.5, 0.55 * len(grid["depths"]) + 1.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(grid["lengths"])), [str(L) for L in grid["lengths"]])
    ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, "" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"accuracy ({grid['n']} trials per cell)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.eval.retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", type=Path, required=True, help="RUN_DIR, RUN_DIR/checkpoints or a step_N dir")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--lengths", default="1024,2048,4096", help="comma list of prompt lengths (tokens)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma list of needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="per (length, depth) cell")
    p.add_argument("--n-digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-dir", type=Path, default=None, help="natural filler (default: shared, else data/tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of N tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the run's data.tokenizer")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fm_pretrain.config import ConfigError

    from .cli import load_for_eval
    from .report import write_results
    from .run_logging import log_offline_eval

    try:
        step_dir, model, cfg, meta, tok = load_for_eval(args.checkpoint, args.device, args.dtype, args.tokenizer)
        predict = model_predictor(model, tok, args.batch_size, args.prefill_chunk, progress=not args.no_progress)
        results = evaluate_retrieval(
            predict, tok, [t for t in args.tasks.split(",") if t], [int(x) for x in args.lengths.split(",")],
            [float(x) for x in args.depths.split(",")], args.trials, args.n_digits, args.seed, args.corpus_dir,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = int(meta["step"])
    run_dir = step_dir.resolve().parent.parent
    results = {"checkpoint": str(step_dir.resolve()), "step": step, "model_type": cfg.model.model_type, **results}
    out_dir = step_dir / "retrieval"
    out_dir.mkdir(exist_ok=True)
    files = [write_results(results, out_dir / RESULTS_FILE)]
    for task, res in results["tasks"].items():
        files.append(plot_heatmap(res, out_dir / f"retrieval_{task}.png", f"{task}: {run_dir.name} step {step}"))
        print(f"{task}: accuracy {res['overall']:.3f} (chance {res['chance']:g}) over {len(res['lengths'])} lengths "
              f"x {len(res['depths'])} depths x {res['n']} trials")  # fmt: skip
    for task, why in results["skipped"].items():
        print(f"{task}: {why}")
    print(f"results: {files[0]}")
    if args.no_mlflow or not cfg.tracking.enabled:
        return 0
    tags = {"model_type": cfg.model.model_type, "size": cfg.tracking.size or "unknown", "run_dir": str(run_dir)}
    run_id = log_offline_eval(run_dir, cfg.tracking, step, flat_metrics(results), files,
                              f"{METRIC_PREFIX}/step_{step}", "retrieval", tags)  # fmt: skip
    print(f"MLflow: {METRIC_PREFIX}/<task>/acc... at step {step} in run {run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
