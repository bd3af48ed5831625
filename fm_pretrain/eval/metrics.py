"""Per-item scores: multiple-choice picks, answer normalisation, exact match, character F1, number extraction."""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Literal

NormUnit = Literal["chars", "bytes"]
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first (as numpy's argmax, which lm-evaluation-harness uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def continuation_length(text: str, unit: NormUnit) -> int:
    """The length acc_norm divides by: the choice's text without the one-space delimiter before it (" yes" -> 3),
    as lm-evaluation-harness measures its choices; in characters or UTF-8 bytes."""
    choice = text[1:] if text.startswith(" ") else text
    return len(choice.encode("utf-8")) if unit == "bytes" else len(choice)


def choice_scores(
    logprobs: Sequence[float], continuations: Sequence[str], gold: int, unit: NormUnit = "chars"
) -> dict[str, float]:
    """acc: the highest log-likelihood is the gold choice; acc_norm: the same after dividing each log-likelihood
    by its choice's length (`continuation_length`: lm-evaluation-harness's acc_norm) in characters or UTF-8 bytes."""
    lengths = [continuation_length(c, unit) for c in continuations]
    if min(lengths) <= 0:
        raise ValueError(f"acc_norm needs non-empty continuations, got lengths {lengths}")
    norm = [lp / n for lp, n in zip(logprobs, lengths, strict=True)]
    return {"acc": float(argmax_first(logprobs) == gold), "acc_norm": float(argmax_first(norm) == gold)}


def normalize_answer(text: str, lang: str) -> str:
    """Answer normalisation before comparison.

    Both languages: Unicode NFKC (full-width letters and digits become ASCII), lower case, punctuation removed
    (every Unicode P* character, so 「」、。・ too). English also drops the articles a/an/the and collapses
    whitespace (SQuAD); Japanese drops all whitespace, which carries no meaning between Japanese words.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P") and ch not in string.punctuation)
    if lang == "en":
        return " ".join(_ARTICLES.sub(" ", text).split())
    return "".join(text.split())


def exact_match(prediction: str, answers: Sequence[str], lang: str) -> float:
    pred = normalize_answer(prediction, lang)
    return float(any(pred == normalize_answer(a, lang) for a in answers))


def char_f1(prediction: str, answers: Sequence[str], lang: str) -> float:
    """SQuAD-style F1 over characters of the normalised strings (as JGLUE scores JSQuAD), best over answers."""
    pred = normalize_answer(prediction, lang)
    best = 0.0
    for ans in answers:
        gold = normalize_answer(ans, lang)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def extract_number(text: str) -> float | None:
    """The last number in the text (after NFKC, so full-width digits count; thousands commas allowed)."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(prediction: str, answers: Sequence[str]) -> float:
    pred = extract_number(prediction)
    if pred is None:
        return 0.0
    golds = [extract_number(a) for a in answers]
    return float(any(g is not None and math.isclose(pred, g, rel_tol=0, abs_tol=1e-6) for g in golds))


def first_line(text: str) -> str:
    """Generated text up to the first newline, trimmed: the answer of a one-line QA format."""
    return text.split("\n", 1)[0].strip()
