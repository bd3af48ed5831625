"""lm-evaluation-harness tasks over our local EN/JA data (no hub access): the loader, document preparation for the
tasks whose prompt needs code, and the generation metrics.

Every task YAML here loads its documents with `custom_dataset: !function utils.load`: the rows of our fixtures (or
of a full tree laid out like `shared/data/eval`, given as `--metadata '{"data_dir": "..."}'` or the environment
variable FM_EVAL_DATA_DIR) read by our readers (fm_pretrain/eval/readers.py), the rows our task builders skip left
out (so both harnesses score the same items, in the same order), each row projected onto the fields its prompt
template uses (`dataset_kwargs.fields`, or `dataset_kwargs.columns` to name a TSV's columns). A task with a train
split (or train rows, XWinograd) gets a `train` split: the few-shot pool, as in our harness.

Prompts are in the YAMLs (Jinja), written from the usual lm-evaluation-harness / JGLUE formats, which our harness
uses too (docs/evaluation.md); tests/export/test_harness_parity.py checks that both give the same per-item
log-likelihoods. Generation metrics reuse fm_pretrain.eval.metrics, so the numbers mean the same in both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fm_pretrain.eval.items import SkipItem
from fm_pretrain.eval.metrics import char_f1, exact_match, first_line, numeric_match
from fm_pretrain.eval.readers import Record
from fm_pretrain.eval.tasks import DEFAULT_DATA_DIR, TASKS
from fm_pretrain.eval.tasks_en import _hellaswag_clean, xwinograd

DATA_DIR_ENV = "FM_EVAL_DATA_DIR"


def data_root(data_dir: str | None = None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def _project(rec: Record, fields: list[str] | None, columns: list[str] | None) -> dict[str, Any]:
    if columns is not None:
        return dict(zip(columns, rec.data, strict=True))
    return {k: rec.data[k] for k in fields} if fields else dict(rec.data)


def _docs(task: str, path: Path, fields, columns) -> tuple[list[dict], list[dict]]:
    """(eval rows, few-shot rows of the same file) that our builder accepts, projected."""
    t = TASKS[task]
    evals, pool = [], []
    for rec in t.read(path):
        try:
            t.build(rec)
        except SkipItem:
            continue
        (pool if t.split and t.split(rec) != "eval" else evals).append(_project(rec, fields, columns))
    return evals, pool


def load(
    task: str,
    fields: list[str] | None = None,
    columns: list[str] | None = None,
    data_dir: str | None = None,
    **_: Any,
):
    """DatasetDict {"test": the eval rows, "train": the few-shot pool (when the task has one)} of one of our tasks."""
    import datasets

    t = TASKS[task]
    root = data_root(data_dir)
    test, pool = _docs(task, root / t.path, fields, columns)
    if t.fewshot_path is not None:
        pool, _ = _docs(task, root / t.fewshot_path, fields, columns)
    splits = {"test": datasets.Dataset.from_list(test)}
    if pool:
        splits["train"] = datasets.Dataset.from_list(pool)
    return datasets.DatasetDict(splits)


# --- HellaSwag: WikiHow artefacts cleaned as in our harness (and lm-evaluation-harness) ---
def hellaswag_docs(dataset):
    def prepare(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(prepare)


# --- WinoGrande (partial scoring): each option completes the sentence up to the blank; the rest is scored ---
def winogrande_gold(doc: dict) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc: dict) -> list[str]:
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]]


def winogrande_rest(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :]


# --- XWinograd (partial scoring): the pronoun's span, located from the PTB tokens, replaced by each candidate ---
XWINOGRAD_COLUMNS = ["lang", "origin", "key", "text", "tokens", "pronoun", "candidates"]


def _xwinograd_item(doc: dict):
    return xwinograd(Record("xwinograd:0", [doc[c] for c in XWINOGRAD_COLUMNS]))


def xwinograd_gold(doc: dict) -> int:
    return _xwinograd_item(doc).gold


def xwinograd_contexts(doc: dict) -> list[str]:
    return list(_xwinograd_item(doc).contexts)


def xwinograd_rest(doc: dict) -> str:
    return _xwinograd_item(doc).continuations[0]


# --- generation: the answer is the first line of the output; metrics as in our harness ---
def _answers(doc: dict) -> list[str]:
    if "answers" in doc:  # JSQuAD ({text, answer_start}), NIILC (strings)
        raw = [a["text"] if isinstance(a, dict) else a for a in doc["answers"]]
    else:
        raw = [doc["answer"]]
    return [a.strip() for a in raw if a.strip()]


def first_answer(doc: dict) -> str:
    """The gold answer of a solved few-shot example."""
    return _answers(doc)[0]


def _qa(doc: dict, results: list[str], lang: str) -> dict[str, float]:
    answer, golds = first_line(results[0]), _answers(doc)
    return {"exact_match": exact_match(answer, golds, lang), "char_f1": char_f1(answer, golds, lang)}


def process_qa_en(doc: dict, results: list[str]) -> dict[str, float]:
    return _qa(doc, results, "en")


def process_qa_ja(doc: dict, results: list[str]) -> dict[str, float]:
    return _qa(doc, results, "ja")


def process_numeric(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": numeric_match(first_line(results[0]), [doc["answer"].strip()])}
