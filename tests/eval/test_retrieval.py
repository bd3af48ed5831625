"""Retrieval prompts and scoring: the needle sits where the depth says and the prompt has exactly the requested
tokens (passkey, EN and JA needles); a perfect reader scores 1 and a constant answer scores chance; the CLI writes
the grid, heatmaps and MLflow metrics. MQAR: the generator's structure and its packed form read back by training."""

import json
import math
import re

import pytest

from fm_pretrain.data import IGNORE_INDEX
from fm_pretrain.data.packed import PackedDataset
from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.eval.mqar import MQARConfig, mqar_accuracy, mqar_examples, write_packed
from fm_pretrain.eval.retrieval import (
    NEEDLE,
    PASSKEY,
    evaluate_retrieval,
    filler_units,
    flat_metrics,
    main,
    make_trials,
    model_predictor,
    score,
)
from tests.helpers.paths import TINY_DATA
from tests.inference.tiny_models import tiny_config, tiny_lm, write_checkpoint


@pytest.fixture(scope="module")
def tok(packed) -> Tokenizer:
    return Tokenizer(packed / "tokenizer.model")


@pytest.mark.parametrize("task", ["passkey", "needle_en", "needle_ja"])
def test_the_needle_is_at_its_depth_and_the_prompt_has_the_requested_length(tok, task):
    template = PASSKEY if task == "passkey" else NEEDLE[task[-2:]]
    prefix = [tok.bos_id, *tok.encode(template.intro)]
    question = tok.encode(template.question)
    longest_unit = max(len(u) for u in filler_units(task, tok, TINY_DATA))
    trials = make_trials(task, tok, [300, 1001], [0.0, 0.3, 0.5, 1.0], n_trials=2, seed=1, corpus_dir=TINY_DATA)
    assert len(trials) == 16
    for t in trials:
        assert len(t.ids) == t.length  # exactly the requested tokens
        assert t.ids[: len(prefix)] == prefix and t.ids[t.length - len(question) :] == question
        needle = tok.encode(template.needle.format(key=t.answer))
        assert t.ids[t.needle_start : t.needle_end] == needle and t.answer in tok.decode(needle)
        n_fill = t.length - len(prefix) - len(needle) - len(question)
        at = t.needle_start - len(prefix)  # filler tokens before the needle
        assert abs(at - t.depth * n_fill) <= longest_unit / 2 + 1, (t.depth, at, n_fill)
        if t.depth == 0.0:
            assert at == 0
        if t.depth == 1.0:
            assert t.needle_end == t.length - len(question)
    assert len({t.answer for t in trials}) > 1


def test_a_perfect_reader_scores_one_and_a_constant_answer_scores_chance(tok):
    trials = make_trials("passkey", tok, [120], [0.0, 0.5, 1.0], n_trials=100, n_digits=1, seed=3)

    def reader(ts):  # reads the number back out of the prompt text
        return [re.search(r"pass key is (\d+)", tok.decode(t.ids)).group(1) for t in ts]

    assert all(score(trials, reader(trials)))
    got = evaluate_retrieval(reader, tok, ["passkey"], [120], [0.0, 0.5, 1.0], 100, n_digits=1, seed=3)
    assert got["tasks"]["passkey"]["overall"] == 1.0 and got["tasks"]["passkey"]["chance"] == 0.1
    const = evaluate_retrieval(lambda ts: [" 7."] * len(ts), tok, ["passkey"], [120], [0.0, 0.5, 1.0], 100, 1, 3)
    acc = const["tasks"]["passkey"]["overall"]
    assert acc == sum(t.answer == "7" for t in trials) / 300  # exactly the trials whose number is 7
    assert abs(acc - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 300)  # which is chance, 1 in 10
    assert score(trials[:2], ["", "abc"]) == [False, False]


def test_model_path_cli_and_heatmaps(tok, tmp_path, capsys):
    """The real model path end to end (MLflow logging is shared with the long-context CLI and tested there)."""
    model = tiny_lm("hybrid", vocab=tok.vocab_size)
    res = evaluate_retrieval(model_predictor(model, tok, batch_size=4), tok, ["needle_ja"], [80, 120], [0.0, 1.0], 2,
                             corpus_dir=TINY_DATA)  # fmt: skip
    grid = res["tasks"]["needle_ja"]
    assert grid["lengths"] == [80, 120] and grid["depths"] == [0.0, 1.0] and grid["n"] == 2
    assert all(0.0 <= v <= 1.0 for row in grid["acc"] for v in row)
    skipped = evaluate_retrieval(model_predictor(model, tok), tok, ["needle_en"], [80], [0.5], 1, corpus_dir=tmp_path)
    assert skipped["tasks"] == {} and "no en corpus found" in skipped["skipped"]["needle_en"]

    step_dir = write_checkpoint(model, tiny_config("hybrid", tok.vocab_size, tok.path), tmp_path / "run", step=2)
    argv = ["--checkpoint", str(tmp_path / "run"), "--tasks", "passkey,needle_en", "--lengths", "150,200"]
    argv += ["--depths", "0,0.5,1", "--trials", "2", "--corpus-dir", str(TINY_DATA), "--no-progress", "--no-mlflow"]
    assert main(argv) == 0
    assert "passkey: accuracy" in capsys.readouterr().out
    saved = json.loads((step_dir / "retrieval" / "retrieval.json").read_text())
    assert saved["tasks"]["needle_en"]["n"] == 2 and len(saved["tasks"]["passkey"]["acc"]) == 3
    for task in ("passkey", "needle_en"):
        assert (step_dir / "retrieval" / f"retrieval_{task}.png").stat().st_size > 5_000
    metrics = flat_metrics(saved)
    assert metrics["retrieval/passkey/acc"] == saved["tasks"]["passkey"]["overall"]
    assert metrics["retrieval/needle_en/acc/200/0.5"] == saved["tasks"]["needle_en"]["acc"][1][1]
    assert len(metrics) == 2 * (1 + 2 + 2 * 3)  # per task: overall, per length, per cell


def test_mqar_examples_and_their_packed_form(tok, tmp_path):
    cfg = MQARConfig(seq_len=64, num_kv_pairs=8, vocab_size=tok.vocab_size, power_a=0.1)
    ids, labels = mqar_examples(50, cfg, seed=0)
    assert ids.shape == labels.shape == (50, 64)
    first_query = []
    for x, y in zip(ids.tolist(), labels.tolist(), strict=True):
        pairs = dict(zip(x[0:16:2], x[1:16:2], strict=True))
        assert len(pairs) == 8 and all(cfg.key_range[0] <= k < cfg.key_range[1] for k in pairs)
        queries = [p for p, lab in enumerate(y) if lab != IGNORE_INDEX]
        assert len(queries) == 8 and all(p >= 16 and p % 2 == 0 for p in queries)
        assert {x[p] for p in queries} == set(pairs)  # every key queried once
        assert all(y[p] == pairs[x[p]] == x[p + 1] for p in queries)  # labelled with its value, which follows
        first_query.append(min(queries))
    assert sum(first_query) / 50 < 16 + 2 * 4  # a = 0.1 puts queries near the pairs
    uniform = mqar_examples(50, MQARConfig(64, 8, tok.vocab_size, power_a=1.0), seed=0)[1]
    assert (
        uniform.ne(IGNORE_INDEX).nonzero()[:, 1].float().mean() > labels.ne(IGNORE_INDEX).nonzero()[:, 1].float().mean()
    )
    assert 0.0 <= mqar_accuracy(tiny_lm("fm_sparse", vocab=tok.vocab_size), ids[:8], labels[:8]) <= 1.0

    out = write_packed(tmp_path / "mqar", cfg, n_train=20, n_valid=5, seed=0, tokenizer=tok)
    ds = PackedDataset(out, "train", seq_len=66, expect_tokenizer_sha256=tok.sha256)
    assert len(ds) == 19 and ds.num_docs == 20
    train_ids, _ = mqar_examples(20, cfg, seed=0)
    sample = ds[3]["input_ids"].tolist()
    assert sample == [tok.bos_id, *train_ids[3].tolist(), tok.eos_id]
    assert PackedDataset(out, "valid", seq_len=66).num_docs == 5
