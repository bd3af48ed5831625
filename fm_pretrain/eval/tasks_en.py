"""English tasks: prompt formats follow lm-evaluation-harness's defaults (see docs/evaluation.md)."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from .items import Item, SkipItem, Task
from .readers import EvalDataError, Record, read_jsonl, read_tsv

XWINOGRAD_COLS = 7
PTB_TOKENS = {"``": '"', "''": '"', "-LRB-": "(", "-RRB-": ")"}  # XWinograd's English tokens are PTB-style


def line_id(rec: Record) -> str:
    """The source line number, for files without a reliable id field."""
    return rec.where.rsplit(":", 1)[1]


def mc_item(rec: Record, item_id: str, context: str, choices: list[str], gold: int) -> Item:
    if not 0 <= gold < len(choices):
        raise EvalDataError(f"{rec.where}: gold index {gold} outside the {len(choices)} choices")
    if any(not c.strip() for c in choices):
        raise SkipItem("empty choice")
    return Item(item_id, rec.where, (context,) * len(choices), tuple(choices), gold)


def labelled_choices(rec: Record, question: str) -> Item:
    """ARC and OpenBookQA: `choices: {text, label}` and `answerKey` naming one label."""
    choices = rec.get("choices", dict)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise EvalDataError(f"{rec.where}: key 'choices' needs equally long 'text' and 'label' lists")
    key = rec.get("answerKey")
    if key not in labels:
        raise EvalDataError(f"{rec.where}: answerKey {key!r} is not one of the labels {labels}")
    return mc_item(rec, rec.get("id"), question, [" " + str(t) for t in texts], labels.index(key))


def arc(rec: Record) -> Item:
    return labelled_choices(rec, f"Question: {rec.get('question')}\nAnswer:")


def openbookqa(rec: Record) -> Item:
    return labelled_choices(rec, rec.get("question_stem"))


def boolq(rec: Record) -> Item:
    context = f"{rec.get('passage')}\nQuestion: {rec.get('question')}?\nAnswer:"
    return mc_item(rec, line_id(rec), context, [" no", " yes"], int(rec.get("answer", bool)))


def _hellaswag_clean(text: str) -> str:
    """WikiHow artefacts out: ' [title]' becomes a sentence break, other [tags] go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(rec: Record) -> Item:
    ctx = rec.get("ctx_a") + " " + rec.get("ctx_b").capitalize()
    context = _hellaswag_clean(rec.get("activity_label") + ": " + ctx)
    endings = rec.get("endings", list)
    label = rec.get("label")
    if not label.isdigit():
        raise EvalDataError(f"{rec.where}: key 'label' should be a digit string, got {label!r}")
    return mc_item(rec, line_id(rec), context, [" " + _hellaswag_clean(str(e)) for e in endings], int(label))


def piqa(rec: Record) -> Item:
    context = f"Question: {rec.get('goal')}\nAnswer:"
    return mc_item(rec, line_id(rec), context, [" " + rec.get("sol1"), " " + rec.get("sol2")], rec.get("label", int))


def partial_item(rec: Record, item_id: str, before: str, options: list[str], after: str, gold: int) -> Item:
    """Partial scoring: each option completes the text before the blank; the shared rest is what is scored."""
    if not after.strip():
        raise SkipItem("nothing after the blank to score")
    return Item(item_id, rec.where, tuple(before + o for o in options), (after,) * len(options), gold)


def winogrande(rec: Record) -> Item:
    sentence = rec.get("sentence")
    if sentence.count("_") != 1:
        raise EvalDataError(f"{rec.where}: key 'sentence' should hold exactly one '_' blank")
    answer = rec.get("answer")
    if answer not in ("1", "2"):
        raise EvalDataError(f"{rec.where}: key 'answer' should be '1' or '2', got {answer!r}")
    i = sentence.index("_")
    options = [rec.get("option1"), rec.get("option2")]
    return partial_item(rec, line_id(rec), sentence[:i], options, sentence[i + 1 :], int(answer) - 1)


def _token_offsets(text: str, tokens: list[str]) -> list[tuple[int, int]] | None:
    """Character span of each token, found left to right in the sentence (None if one is not found)."""
    spans, pos = [], 0
    for tok in tokens:
        tok = PTB_TOKENS.get(tok, tok)
        start = text.find(tok, pos)
        if start < 0:
            return None
        spans.append((start, start + len(tok)))
        pos = start + len(tok)
    return spans


def xwinograd(rec: Record) -> Item:
    """The pronoun's token span, located in the sentence, is replaced by each candidate (partial scoring)."""
    text = rec.col(3)
    tokens = rec.json_col(4, "tokens")
    pronoun = rec.json_col(5, "pronoun")
    candidates = rec.json_col(6, "candidates")
    if not (isinstance(candidates, list) and len(candidates) == 2 and all(len(c) == 4 for c in candidates)):
        raise EvalDataError(f"{rec.where}: column 7 should hold two [text, span, tokens, is_correct] candidates")
    correct = [bool(c[3]) for c in candidates]
    if sum(correct) != 1:
        raise EvalDataError(f"{rec.where}: column 7 should mark exactly one candidate correct, got {correct}")
    spans = _token_offsets(text, tokens)
    p_start, p_end = pronoun[1]
    if spans is None or not 0 <= p_start < p_end <= len(spans):
        raise SkipItem("pronoun span not found in the sentence")
    before, after = text[: spans[p_start][0]], text[spans[p_end - 1][1] :]
    return partial_item(rec, line_id(rec), before, [str(c[0]) for c in candidates], after, correct.index(True))


def xwinograd_split(rec: Record) -> str:
    """Rows from a train subset (column 2 `wsc_naive.train`, `superglue.train`, `train`) are few-shot material."""
    return "fewshot" if "train" in rec.col(1) else "eval"


def lambada(rec: Record) -> Item:
    query = rec.get("query")
    answers = rec.get("answers_text", list)
    if len(answers) != 1 or not isinstance(answers[0], str):
        raise EvalDataError(f"{rec.where}: key 'answers_text' should be a list of one word, got {answers!r}")
    target = answers[0] if query[-1:].isspace() else " " + answers[0]
    return Item(str(rec.get("id", int)), rec.where, (query,), (target,))


def mgsm(rec: Record, question: str, answer: str, answer_prefix: str) -> Item:
    """MGSM, direct answer (no chain of thought): the number after the answer cue."""
    gold = rec.col(1).strip()
    if not gold:
        raise EvalDataError(f"{rec.where}: column 2 (answer) is empty")
    prompt = f"{question}{rec.col(0).strip()}\n{answer}"
    return Item(line_id(rec), rec.where, (prompt,), answers=(gold,), answer_prefix=answer_prefix)


def tsv(n_cols: int):
    return lambda path: read_tsv(Path(path), n_cols)


def mgsm_task(lang: str, path: str, question: str, answer: str, answer_prefix: str) -> Task:
    """MGSM in one language: greedy generation, scored on the last number of the answer."""
    prompt = partial(mgsm, question=question, answer=answer, answer_prefix=answer_prefix)
    return Task(
        f"mgsm_{lang}", lang, "generate", path, tsv(2), prompt, numeric=True, max_new_tokens=16, primary="exact_match"
    )


def xwinograd_task(name: str, lang: str, path: str) -> Task:
    """XWinograd in one language: partial scoring; the rows marked train are the few-shot pool."""
    return Task(name, lang, "choice", path, tsv(XWINOGRAD_COLS), xwinograd, split=xwinograd_split, partial=True)


TASKS = [
    Task("arc_easy", "en", "choice", "en/arc_easy/validation.jsonl", read_jsonl, arc, primary="acc_norm"),
    Task("arc_challenge", "en", "choice", "en/arc_challenge/validation.jsonl", read_jsonl, arc, primary="acc_norm"),
    Task("boolq", "en", "choice", "en/boolq/validation.jsonl", read_jsonl, boolq),
    Task("hellaswag", "en", "choice", "en/hellaswag/validation.jsonl", read_jsonl, hellaswag, primary="acc_norm"),
    Task("lambada_openai", "en", "lastword", "en/lambada_openai/test.jsonl", read_jsonl, lambada),
    mgsm_task("en", "en/mgsm/mgsm_en.tsv", question="Question: ", answer="Answer:", answer_prefix=" "),
    Task("openbookqa", "en", "choice", "en/openbookqa/validation.jsonl", read_jsonl, openbookqa, primary="acc_norm"),
    Task("piqa", "en", "choice", "en/piqa/validation.jsonl", read_jsonl, piqa, primary="acc_norm"),
    Task("winogrande", "en", "choice", "en/winogrande/validation.jsonl", read_jsonl, winogrande, partial=True),
    xwinograd_task("xwinograd_en", "en", "en/xwinograd/xwinograd_en.tsv"),
]
