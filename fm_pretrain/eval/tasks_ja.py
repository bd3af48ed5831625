"""Japanese tasks: JGLUE (JCommonsenseQA, JNLI, JSQuAD), JEMHopQA, NIILC, MGSM-ja, XWinograd-jp.

Prompts are plain cloze / question-answer formats for base models (see docs/evaluation.md); the answer follows
the full-width colon directly, with no space, as Japanese text does.
"""

from __future__ import annotations

from .items import Item, SkipItem, Task
from .readers import EvalDataError, Record, read_json_array, read_jsonl, read_niilc_xml, read_squad
from .tasks_en import mc_item, mgsm_task, xwinograd_task

JNLI_LABELS = {"entailment": "含意", "contradiction": "矛盾", "neutral": "中立"}
JCQA_CHOICES = 5


def jcommonsenseqa(rec: Record) -> Item:
    choices = [rec.get(f"choice{i}") for i in range(JCQA_CHOICES)]
    return mc_item(
        rec, str(rec.get("q_id", int)), f"質問：{rec.get('question')}\n回答：", choices, rec.get("label", int)
    )


def jnli(rec: Record) -> Item:
    label = rec.get("label")
    if label not in JNLI_LABELS:
        raise EvalDataError(f"{rec.where}: key 'label' should be one of {list(JNLI_LABELS)}, got {label!r}")
    context = f"前提：{rec.get('sentence1')}\n仮説：{rec.get('sentence2')}\n関係："
    return mc_item(
        rec, rec.get("sentence_pair_id"), context, list(JNLI_LABELS.values()), list(JNLI_LABELS).index(label)
    )


def qa_item(rec: Record, item_id: str, prompt: str, answers: list[str]) -> Item:
    answers = [a.strip() for a in answers if a.strip()]
    if not answers:
        raise SkipItem("no gold answer")
    return Item(item_id, rec.where, (prompt,), answers=tuple(answers))


def jsquad(rec: Record) -> Item:
    if rec.get("is_impossible", bool):
        raise SkipItem("unanswerable question (is_impossible)")
    title, context = rec.get("title"), rec.get("context")
    body = context.split(" [SEP] ", 1)[1] if " [SEP] " in context else context  # contexts open with "title [SEP] "
    golds = []
    for i, ans in enumerate(rec.get("answers", list)):
        if not isinstance(ans, dict) or not isinstance(ans.get("text"), str):
            raise EvalDataError(f"{rec.where}: answers[{i}] should be an object with a string 'text'")
        golds.append(ans["text"])
    prompt = f"タイトル：{title}\n文章：{body}\n質問：{rec.get('question')}\n回答："
    return qa_item(rec, rec.get("id"), prompt, golds)


def jemhopqa(rec: Record) -> Item:
    return qa_item(rec, rec.get("qid"), f"質問：{rec.get('question')}\n回答：", [rec.get("answer")])


def niilc(rec: Record) -> Item:
    return qa_item(rec, rec.get("id"), f"質問：{rec.get('text')}\n回答：", rec.get("answers", list))


TASKS = [
    Task(
        "jcommonsenseqa",
        "ja",
        "choice",
        "ja/jcommonsenseqa/valid.jsonl",
        read_jsonl,
        jcommonsenseqa,
        fewshot_path="ja/jcommonsenseqa/train.jsonl",
    ),  # fmt: skip
    Task("jnli", "ja", "choice", "ja/jnli/valid.jsonl", read_jsonl, jnli),
    Task("jsquad", "ja", "generate", "ja/jsquad/valid.json", read_squad, jsquad, primary="char_f1"),
    Task(
        "jemhopqa",
        "ja",
        "generate",
        "ja/jemhopqa/dev.json",
        read_json_array,
        jemhopqa,
        fewshot_path="ja/jemhopqa/train.json",
        primary="char_f1",
    ),  # fmt: skip
    mgsm_task("ja", "ja/mgsm/mgsm_ja.tsv", question="問題：", answer="答え：", answer_prefix=""),
    Task("niilc", "ja", "generate", "ja/niilc/dev.xml", read_niilc_xml, niilc, primary="char_f1"),
    xwinograd_task("xwinograd_jp", "ja", "ja/xwinograd/xwinograd_jp.tsv"),
]
