"""Evaluation data: every committed fixture parses with reconciled counts, bad input names its place, the
fixtures are the first items of the real files, and the real files (../shared) hold the counts their README states."""

import json
from pathlib import Path

import pytest

from fm_pretrain.eval import DEFAULT_DATA_DIR, GROUPS, TASKS, EvalDataError, load_task, resolve_tasks
from fm_pretrain.eval.fixtures import make_fixtures
from fm_pretrain.eval.readers import read_jsonl, read_niilc_xml, read_squad, read_tsv
from tests.helpers.paths import SHARED_DATA

SHARED_EVAL = SHARED_DATA / "eval"
FIXTURE_ITEMS, FIXTURE_FEWSHOT = 30, 10
# Few-shot pools of the fixtures that come from a train split (or train rows) rather than the eval split itself.
FIXTURE_POOLS = {"xwinograd_en": 10, "xwinograd_jp": 10, "jcommonsenseqa": 10, "jemhopqa": 10}
# Rows per task in shared/data/README.md; XWinograd: eval rows, and train rows used for few-shot.
README_ROWS = {
    "arc_challenge": 299, "arc_easy": 570, "boolq": 3270, "hellaswag": 10042, "lambada_openai": 5153, "mgsm_en": 250,
    "openbookqa": 500, "piqa": 1838, "winogrande": 1267, "xwinograd_en": 273 + 1320 + 35,
    "jcommonsenseqa": 1119, "jnli": 2434, "jsquad": 4442, "jemhopqa": 120, "mgsm_ja": 250, "niilc": 800,
    "xwinograd_jp": 273,
}  # fmt: skip
README_POOLS = {"xwinograd_en": 562 + 135, "xwinograd_jp": 686, "jcommonsenseqa": 8939, "jemhopqa": 1059}


def shared_eval() -> Path:
    if not SHARED_EVAL.is_dir():
        pytest.skip(f"../shared/data/eval is not present next to the repo ({SHARED_EVAL}); skipping the real-data test")
    return SHARED_EVAL


def test_registry_covers_every_task_and_resolves_groups():
    assert len(TASKS) == 17
    assert GROUPS["en"] + GROUPS["ja"] == GROUPS["all"] == list(TASKS)
    assert [t.name for t in resolve_tasks("hellaswag,ja,jnli")] == ["hellaswag", *GROUPS["ja"]]
    with pytest.raises(ValueError, match="unknown task 'helaswag'"):
        resolve_tasks("helaswag")


@pytest.mark.parametrize("name", list(TASKS))
def test_every_fixture_loads_with_reconciled_counts(name):
    task = TASKS[name]
    loaded = load_task(task, DEFAULT_DATA_DIR)
    assert loaded.rows == FIXTURE_ITEMS == len(loaded.items) + sum(loaded.skipped.values())
    assert not loaded.skipped, f"{name}: fixture rows skipped: {dict(loaded.skipped)}"
    assert len({i.id for i in loaded.items}) == len(loaded.items)
    assert len(loaded.pool) == FIXTURE_POOLS.get(name, FIXTURE_ITEMS)
    assert loaded.same_split == (name not in FIXTURE_POOLS)
    for item in loaded.items:
        if task.kind == "choice":
            assert len(item.contexts) == len(item.continuations) >= 2 and 0 <= item.gold < len(item.contexts)
            assert all(item.continuations) and all(item.contexts)
        elif task.kind == "lastword":
            assert len(item.contexts) == len(item.continuations) == 1 and item.continuations[0].startswith(" ")
        else:
            assert len(item.contexts) == 1 and item.answers and all(a.strip() for a in item.answers)


def test_items_follow_the_documented_prompt_formats():
    arc = load_task(TASKS["arc_easy"], DEFAULT_DATA_DIR).items[0]
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations == (" cellular telephone", " television", " refrigerator", " airplane") and arc.gold == 0
    hs = load_task(TASKS["hellaswag"], DEFAULT_DATA_DIR).items[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He" and hs.gold == 3
    wino = load_task(TASKS["winogrande"], DEFAULT_DATA_DIR).items[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")  # fmt: skip
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    xw = load_task(TASKS["xwinograd_jp"], DEFAULT_DATA_DIR).items[0]
    assert xw.contexts == ("狙撃兵はテロリストを撃った。狙撃兵", "狙撃兵はテロリストを撃った。テロリスト")
    assert xw.continuations == ("は悪漢だったからだ。",) * 2 and xw.gold == 1
    xe = load_task(TASKS["xwinograd_en"], DEFAULT_DATA_DIR).items[0]  # a PTB-tokenized pronoun is found too
    assert xe.contexts[0] == "The city councilmen refused the demonstrators a permit because The city councilmen"
    jc = load_task(TASKS["jcommonsenseqa"], DEFAULT_DATA_DIR).items[0]
    assert jc.contexts[0] == "質問：電子機器で使用される最も主要な電子回路基板の事をなんと言う？\n回答："
    assert jc.continuations[jc.gold] == "マザーボード"
    sq = load_task(TASKS["jsquad"], DEFAULT_DATA_DIR).items[0]
    assert sq.contexts[0].startswith("タイトル：梅雨\n文章：梅雨（つゆ、ばいう）") and "[SEP]" not in sq.contexts[0]
    assert (
        sq.contexts[0].endswith("\n質問：日本で梅雨がないのは北海道とどこか。\n回答：")
        and sq.answers[0] == "小笠原諸島"
    )
    ni = load_task(TASKS["niilc"], DEFAULT_DATA_DIR).items[1]
    assert ni.answers == ("愛知県、岐阜県、三重県、静岡県", "愛知県、岐阜県、三重県")
    mg = load_task(TASKS["mgsm_en"], DEFAULT_DATA_DIR).items[0]
    assert mg.contexts[0].startswith("Question: Janet’s ducks") and mg.contexts[0].endswith("?\nAnswer:")
    assert mg.demonstration().endswith("\nAnswer: 18")
    assert load_task(TASKS["mgsm_ja"], DEFAULT_DATA_DIR).items[0].demonstration().endswith("\n答え：18")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_input_names_file_and_line_or_key(tmp_path):
    bad_json = write(tmp_path / "a.jsonl", '{"question": "q"}\n{not json\n')
    with pytest.raises(EvalDataError, match=r"a\.jsonl:2: not valid JSON"):
        list(read_jsonl(bad_json))
    missing = write(tmp_path / "b.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g"}\n')
    (tmp_path / "en" / "piqa").mkdir(parents=True)
    missing.rename(tmp_path / "en" / "piqa" / "validation.jsonl")
    with pytest.raises(EvalDataError, match=r"validation\.jsonl:2: missing key 'sol1'"):
        load_task(TASKS["piqa"], tmp_path)
    wrong_type = write(
        tmp_path / "en" / "piqa" / "validation.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b", "label": "0"}\n'
    )
    with pytest.raises(EvalDataError, match=r"validation\.jsonl:1: key 'label' should be int, got '0'"):
        load_task(TASKS["piqa"], wrong_type.parents[2])
    tsv = write(tmp_path / "m.tsv", "q1\t1\nq2 without answer\n")
    with pytest.raises(EvalDataError, match=r"m\.tsv:2: expected 2 tab-separated columns, got 1"):
        list(read_tsv(tsv, 2))
    xml = write(tmp_path / "d.xml", "<questions>\n<question id='x'><text>q</text>\n</questions>\n")
    with pytest.raises(EvalDataError, match=r"d\.xml:3: XML parse error"):
        list(read_niilc_xml(xml))
    no_text = write(tmp_path / "e.xml", "<questions><question id='q1'><answers/></question></questions>")
    with pytest.raises(EvalDataError, match=r"e\.xml:question\[0\] id=q1: missing or empty <text>"):
        list(read_niilc_xml(no_text))
    paragraphs = [{"context": "c", "qas": [{"id": "1"}]}, {"qas": []}]
    squad = write(tmp_path / "s.json", json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    with pytest.raises(EvalDataError, match=r"s\.json:data\[0\]\.paragraphs\[1\]: missing key 'context'"):
        list(read_squad(squad))
    (tmp_path / "en" / "arc_easy").mkdir(parents=True)
    arc = {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    write(tmp_path / "en" / "arc_easy" / "validation.jsonl", json.dumps(arc) + "\n")
    with pytest.raises(EvalDataError, match=r"validation\.jsonl:1: answerKey 'C' is not one of the labels"):
        load_task(TASKS["arc_easy"], tmp_path)


def test_unscorable_rows_are_skipped_with_a_reason_and_counted(tmp_path):
    (tmp_path / "ja" / "niilc").mkdir(parents=True)
    q = "<question id='{}'><text>質問{}</text><answers>{}</answers></question>\n"
    xml = (
        "<questions>\n"
        + q.format("a", 1, "<answer>答</answer>")
        + q.format("b", 2, "<answer> </answer>")
        + "</questions>"
    )
    write(tmp_path / "ja" / "niilc" / "dev.xml", xml)
    loaded = load_task(TASKS["niilc"], tmp_path)
    assert loaded.rows == 2 and [i.id for i in loaded.items] == ["a"] and dict(loaded.skipped) == {"no gold answer": 1}


def test_committed_fixtures_are_the_first_items_of_the_real_files(tmp_path):
    src = shared_eval()
    for path in make_fixtures(src, tmp_path / "eval", FIXTURE_ITEMS, FIXTURE_FEWSHOT):
        rel = path.relative_to(tmp_path / "eval")
        committed = DEFAULT_DATA_DIR / rel
        assert committed.is_file(), f"{committed} is missing: run python -m fm_pretrain.eval.fixtures"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from the first items of {src / rel}"


@pytest.mark.parametrize("name", list(TASKS))
def test_real_files_hold_the_counts_of_the_shared_readme(name):
    loaded = load_task(TASKS[name], shared_eval())
    assert loaded.rows == README_ROWS[name]
    assert loaded.rows == len(loaded.items) + sum(loaded.skipped.values())
    assert not loaded.skipped, f"{name}: {dict(loaded.skipped)}"
    if name in README_POOLS:
        assert len(loaded.pool) == README_POOLS[name] and not loaded.same_split
