"""Our evaluation harness and lm-evaluation-harness, on the same model, items and prompts, agree.

The model is the tiny hybrid trained with ZeRO-1 (tests/export/conftest.py); lm-evaluation-harness runs it twice:
as the transformers export (`HFLM`, i.e. `--model hf --model_args pretrained=DIR,trust_remote_code=True`) and as the
checkpoint itself (`--model fm_pretrain --model_args checkpoint=RUN_DIR`), on our task YAMLs
(fm_pretrain/eval/lm_eval_tasks). Three tasks cover the three request kinds: ARC-Easy (multiple choice), LAMBADA
(last word: greedy match and perplexity) and NIILC (Japanese generation, exact match and character F1). Per-item
log-likelihoods agree to 1e-5 (relative), greedy flags, generated answers and every metric exactly; batch size 1 and 8
give the same. 0-shot: each harness draws its own few-shot examples.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fm_pretrain.checkpoint import load_model
from fm_pretrain.eval import evaluate_model, load_task
from fm_pretrain.eval.cli import load_tokenizer
from fm_pretrain.eval.lm_eval_model import TASKS_DIR
from fm_pretrain.eval.scoring import encode_pair, encode_prompt, generate, loglikelihoods
from fm_pretrain.eval.tasks import DEFAULT_DATA_DIR, TASKS

pytestmark = pytest.mark.slow  # a multi-process training run, lm-evaluation-harness end to end

LIMIT = 6
SCORED = ["arc_easy", "lambada_openai"]
GENERATED = ["niilc"]


@pytest.fixture(scope="module")
def setup(train_layout, exported):
    run_dir = train_layout("zero1")
    model, cfg, meta = load_model(run_dir)
    return run_dir, exported(run_dir), model, load_tokenizer(cfg, meta, None)


def ours_per_item(model, tok, batch_size: int) -> dict[str, list]:
    """Our harness's per-item results: [(loglikelihood, greedy) per choice] for scored tasks, the text generated."""
    out: dict[str, list] = {}
    for name in SCORED + GENERATED:
        task = TASKS[name]
        items = load_task(task, DEFAULT_DATA_DIR).items[:LIMIT]
        if task.kind == "generate":
            prompts = [encode_prompt(tok, it.contexts[0], model.cfg.max_seq_len, task.max_new_tokens) for it in items]
            out[name] = generate(model, tok, prompts, task.max_new_tokens, batch_size, progress=False)
            continue
        encs = [[encode_pair(tok, c, x, model.cfg.max_seq_len) for c, x in zip(it.contexts, it.continuations)]
                for it in items]  # fmt: skip
        flat = iter(loglikelihoods(model, [e for es in encs for e in es], batch_size, tok.pad_id, progress=False))
        out[name] = [[next(flat) for _ in es] for es in encs]
    return out


def lm_eval_run(model, batch_size: int, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # ours only: indexing lm-eval's takes 7 s
    return lm_eval.simple_evaluate(
        model=model, tasks=[f"fm_{n}" for n in SCORED + GENERATED], num_fewshot=0, limit=LIMIT, batch_size=batch_size,
        log_samples=True, bootstrap_iters=0, task_manager=tasks, **kwargs,
    )  # fmt: skip


def assert_same_items(ours: dict[str, list], theirs: dict) -> None:
    for name, want in ours.items():
        samples = sorted(theirs["samples"][f"fm_{name}"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(len(want)))
        for s, w in zip(samples, want, strict=True):
            if TASKS[name].kind == "generate":
                assert s["resps"][0][0] == w, (name, s["doc_id"])
                continue
            got = [r[0] for r in s["resps"]]
            assert len(got) == len(w)
            for (ll, greedy), (ll_ours, greedy_ours) in zip(got, w, strict=True):
                assert math.isclose(ll, ll_ours, rel_tol=1e-5, abs_tol=1e-6), (name, s["doc_id"], ll, ll_ours)
                assert bool(greedy) == greedy_ours


def lm_eval_acc_norm(item_lls: list[list[tuple[float, bool]]], name: str) -> float:
    """lm-evaluation-harness's acc_norm from per-item log-likelihoods, written out: each divided by the length of the
    choice's text without the target delimiter (our harness's `continuation_length` follows the same rule)."""
    hits = []
    for item, lls in zip(load_task(TASKS[name], DEFAULT_DATA_DIR).items, item_lls):
        norm = [ll / len(c[1:] if c.startswith(" ") else c) for (ll, _), c in zip(lls, item.continuations)]
        hits.append(float(max(range(len(norm)), key=lambda i: (norm[i], -i)) == item.gold))
    return sum(hits) / len(hits)


def assert_same_metrics(ours: dict[str, list], theirs: dict, metrics: dict) -> None:
    res = {n: theirs["results"][f"fm_{n}"] for n in SCORED + GENERATED}
    mine = {n: metrics["tasks"][n]["metrics"] for n in SCORED + GENERATED}
    assert res["arc_easy"]["acc,none"] == mine["arc_easy"]["acc"]
    assert res["arc_easy"]["acc_norm,none"] == mine["arc_easy"]["acc_norm"]
    assert mine["arc_easy"]["acc_norm"] == lm_eval_acc_norm(ours["arc_easy"], "arc_easy")
    assert res["lambada_openai"]["acc,none"] == mine["lambada_openai"]["acc"]
    assert math.isclose(res["lambada_openai"]["perplexity,none"], mine["lambada_openai"]["perplexity"], rel_tol=1e-5)
    for m in ("exact_match", "char_f1"):
        assert res["niilc"][f"{m},none"] == mine["niilc"][m]


def test_lm_eval_on_the_export_scores_like_our_harness_at_batch_sizes_1_and_8(setup):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from fm_pretrain.export.convert import load_exported

    _, export_dir, model, tok = setup
    hf_model = load_exported(export_dir, torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    runs = {}
    for bs in (1, 8):
        ours = ours_per_item(model, tok, bs)
        metrics = evaluate_model(model, tok, SCORED + GENERATED, limit=LIMIT, batch_size=bs, progress=False)
        theirs = lm_eval_run(HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=bs, device="cpu"), bs)
        assert_same_items(ours, theirs)
        assert_same_metrics(ours, theirs, metrics)
        runs[bs] = (ours, metrics, {n: theirs["results"][f"fm_{n}"] for n in SCORED + GENERATED})
    assert any(runs[1][0]["niilc"]), "every answer empty: the generation check would be vacuous"
    (ours1, metrics1, theirs1), (ours8, metrics8, theirs8) = runs[1], runs[8]
    assert_same_items(ours1, {"samples": {f"fm_{n}": samples(ours8[n]) for n in ours8}})  # ours: 1 == 8
    for name in SCORED + GENERATED:  # every metric, both harnesses: batch size 1 == batch size 8
        for metric, value in metrics1["tasks"][name]["metrics"].items():
            assert math.isclose(value, metrics8["tasks"][name]["metrics"][metric], rel_tol=1e-5), (name, metric)
        for metric, value in theirs1[name].items():
            if isinstance(value, float):
                assert math.isclose(value, theirs8[name][metric], rel_tol=1e-5), (name, metric)


def samples(per_item: list) -> list[dict]:
    """Our per-item results in lm-evaluation-harness's sample form (to compare two of our runs the same way)."""
    return [{"doc_id": i, "resps": [[r] for r in x] if isinstance(x, list) else [[x]]} for i, x in enumerate(per_item)]


def test_lm_eval_on_the_checkpoint_scores_like_our_harness(setup):
    """`--model fm_pretrain --model_args checkpoint=RUN_DIR`: the registered class, built from its argument string."""
    run_dir, _, model, tok = setup
    ours = ours_per_item(model, tok, 8)
    theirs = lm_eval_run("fm_pretrain", 8, model_args=f"checkpoint={run_dir},device=cpu")
    assert_same_items(ours, theirs)
    assert_same_metrics(ours, theirs, evaluate_model(model, tok, SCORED + GENERATED, limit=LIMIT, progress=False))


def run_cli(cmd: list[str], out: Path) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    return json.loads(files[-1].read_text())["results"]


def test_lm_eval_cli_runs_the_export(setup, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` in a real subprocess, on our YAMLs."""
    _, export_dir, model, tok = setup
    hf = run_cli([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                  f"pretrained={export_dir},trust_remote_code=True", "--include_path", str(TASKS_DIR),
                  "--tasks", "fm_arc_easy,fm_niilc", "--limit", "3", "--num_fewshot", "0", "--batch_size", "4",
                  "--device", "cpu", "--output_path", str(tmp_path)], tmp_path)  # fmt: skip
    mine = evaluate_model(model, tok, "arc_easy,niilc", limit=3, progress=False)["tasks"]
    assert hf["fm_arc_easy"]["acc,none"] == mine["arc_easy"]["metrics"]["acc"]
    assert hf["fm_niilc"]["char_f1,none"] == mine["niilc"]["metrics"]["char_f1"]
