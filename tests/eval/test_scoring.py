"""Evaluation scoring against brute force: batched, right-padded log-likelihoods equal one unpadded forward per
sequence for FM, attention and Mamba-2; the text pipeline (tokenization boundary, acc/acc_norm, truncation) equals
a direct computation; generation equals a greedy loop of full forwards; metrics and few-shot edge cases."""

import math
import random

import pytest
import torch

from fm_pretrain.config import from_dict
from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.eval import DEFAULT_DATA_DIR, TASKS, evaluate_model, load_task
from fm_pretrain.eval.items import with_fewshot
from fm_pretrain.eval.metrics import (
    argmax_first,
    char_f1,
    choice_scores,
    exact_match,
    extract_number,
    normalize_answer,
    numeric_match,
)
from fm_pretrain.eval.scoring import Encoded, encode_pair, generate, loglikelihoods
from fm_pretrain.model import DecoderLM

PATTERNS = {"fm": ["fm"], "attention": ["attention"], "mamba2": ["mamba2"], "hybrid": ["fm", "attention", "mamba2"]}


def tiny_lm(pattern: str, vocab: int = 64, dtype: torch.dtype = torch.float64) -> DecoderLM:
    model = {
        "vocab_size": vocab, "d_model": 32, "n_layers": len(PATTERNS[pattern]), "layer_pattern": PATTERNS[pattern],
        "max_seq_len": 256,
        "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": 3, "chunk_size": 4},
        "attention": {"n_heads": 4, "n_kv_heads": 2},
        "mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 4},
    }  # fmt: skip
    torch.manual_seed(0)
    return DecoderLM(from_dict({"model": model}).model).to(dtype).eval()


def brute_logprob(model: DecoderLM, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """One unpadded forward; the sum of log-softmax at each continuation token, and greedy agreement."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    total, greedy = 0.0, True
    for pos in range(len(ids) - n_cont, len(ids)):
        total += logp[pos - 1, ids[pos]].item()
        greedy &= int(logp[pos - 1].argmax()) == ids[pos]
    return total, greedy


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_batched_padded_loglikelihoods_equal_unpadded_forwards(pattern):
    model = tiny_lm(pattern)
    rng = random.Random(0)
    seqs = []
    for _ in range(7):
        n = rng.randint(3, 23)
        seqs.append(Encoded([rng.randrange(1, 64) for _ in range(n)], rng.randint(1, n - 1), 0, False))
    # one sequence made to be the model's greedy continuation, so `greedy` is exercised both ways
    ids = seqs[0].ids[:5]
    for _ in range(3):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    seqs.append(Encoded(ids, 3, 0, False))
    got = loglikelihoods(model, seqs, batch_size=3, pad_id=0, progress=False)
    for s, (lp, greedy) in zip(seqs, got, strict=True):
        want_lp, want_greedy = brute_logprob(model, s.ids, s.n_cont)
        assert lp == pytest.approx(want_lp, rel=1e-9, abs=1e-9)
        assert greedy == want_greedy
    assert got[-1][1] is True and not all(g for _, g in got)


@pytest.fixture(scope="module")
def tok(packed) -> Tokenizer:
    return Tokenizer(packed / "tokenizer.model")


def test_encode_pair_splits_at_the_context_and_cuts_from_the_left(tok):
    enc = encode_pair(tok, "Question: is it?\nAnswer: ", "yes", 100)  # the trailing space moves to the answer
    full = tok.encode("Question: is it?\nAnswer: yes")
    assert enc.ids == [tok.bos_id, *full] and not enc.merged and enc.truncated == 0
    context = [tok.bos_id, *tok.encode("Question: is it?\nAnswer:")]
    assert enc.ids[: -enc.n_cont] == context and enc.ids[-enc.n_cont :] == full[len(context) - 1 :]
    assert tok.id_to_piece(enc.ids[-enc.n_cont]).startswith("▁")  # the space travels with the answer
    # a merge across the boundary ("stat" + "ion" -> "▁st", "ation"): split at the common prefix, counted
    merged = encode_pair(tok, "the stat", "ion", 100)
    assert tok.encode("the stat") != tok.encode("the station")[: len(tok.encode("the stat"))]
    assert merged.merged and merged.ids == [tok.bos_id, *tok.encode("the station")]
    assert tok.decode(merged.ids[-merged.n_cont :]).endswith("ion")
    ja = encode_pair(tok, "質問：どれ？\n回答：", "マザーボード", 100)
    assert tok.decode(ja.ids[-ja.n_cont :]) == "マザーボード"
    cut = encode_pair(tok, "a long context " * 20, " end", 16)
    assert len(cut.ids) == 16 and cut.truncated == len(tok.encode("a long context " * 20 + " end")) + 1 - 16
    assert cut.ids[-cut.n_cont :] == enc_tail(tok, "a long context " * 20, " end")


def enc_tail(tok: Tokenizer, context: str, continuation: str) -> list[int]:
    stripped = context.rstrip()
    return tok.encode(context + continuation)[len(tok.encode(stripped)) :]


def test_choice_task_matches_a_direct_computation(tok):
    """evaluate_model's acc/acc_norm on hellaswag (4 items) equal argmaxes of hand-computed log-likelihoods."""
    model = tiny_lm("hybrid", vocab=tok.vocab_size, dtype=torch.float32)
    res = evaluate_model(model, tok, "hellaswag", limit=4, batch_size=5, progress=False)["tasks"]["hellaswag"]
    acc, acc_norm = [], []
    for item in load_task(TASKS["hellaswag"], DEFAULT_DATA_DIR).items[:4]:
        lps = []
        for ctx, cont in zip(item.contexts, item.continuations, strict=True):
            tail = enc_tail(tok, ctx, cont)
            lps.append(brute_logprob(model, [tok.bos_id, *tok.encode(ctx + cont)], len(tail))[0])
        acc.append(float(max(range(4), key=lambda i: (lps[i], -i)) == item.gold))
        norm = [lp / len(c) for lp, c in zip(lps, item.continuations, strict=True)]
        acc_norm.append(float(max(range(4), key=lambda i: (norm[i], -i)) == item.gold))
    assert res["metrics"]["acc"] == pytest.approx(sum(acc) / 4)
    assert res["metrics"]["acc_norm"] == pytest.approx(sum(acc_norm) / 4)
    assert res["counts"] == {"rows": 30, "limited_out": 26, "scored": 4, "skipped": {}, "truncated_items": 0,
                             "truncated_tokens": 0, "boundary_merged": res["counts"]["boundary_merged"]}  # fmt: skip
    assert res["chance"] == 0.25


def test_lambada_perplexity_and_truncation_are_reported(tok):
    model = tiny_lm("fm", vocab=tok.vocab_size, dtype=torch.float32)
    res = evaluate_model(model, tok, "lambada_openai", limit=3, max_length=24, progress=False)["tasks"]
    r = res["lambada_openai"]
    assert r["counts"]["truncated_items"] == 3 and r["counts"]["truncated_tokens"] > 0 and r["counts"]["scored"] == 3
    lps = []
    for item in load_task(TASKS["lambada_openai"], DEFAULT_DATA_DIR).items[:3]:
        enc = encode_pair(tok, item.contexts[0], item.continuations[0], 24)
        assert len(enc.ids) == 24
        lps.append(brute_logprob(model, enc.ids, enc.n_cont)[0])
    assert r["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(lps) / 3), rel=1e-4)
    tiny = evaluate_model(model, tok, "lambada_openai", limit=3, max_length=2, progress=False)["tasks"]
    assert tiny["lambada_openai"]["counts"]["skipped"] == {"continuation longer than the max length": 3}
    assert tiny["lambada_openai"]["metrics"]["acc"] is None


@pytest.mark.parametrize("pattern", ["fm", "attention", "mamba2"])
def test_generation_equals_a_greedy_loop_of_full_forwards(tok, pattern):
    model = tiny_lm(pattern, vocab=tok.vocab_size, dtype=torch.float64)
    prompts = [
        Encoded([tok.bos_id, *tok.encode(t)], 0, 0, False)
        for t in ("質問：日本の首都は？\n回答：", "Q: a?\nA:", "Q: b?\nA:")
    ]
    got = generate(model, tok, prompts, max_new_tokens=6, batch_size=4, progress=False)
    for p, text in zip(prompts, got, strict=True):
        ids = list(p.ids)
        for _ in range(6):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
        want = tok.decode(ids[len(p.ids) :])
        # generation may stop early once every row has produced a newline: what follows it is never used
        assert text.split("\n")[0] == want.split("\n")[0]
        if "\n" not in want:
            assert text == want


def test_acc_norm_ties_and_length_units():
    # ties go to the first choice, as numpy's argmax
    assert argmax_first([-1.0, -1.0, -3.0]) == 0
    assert choice_scores([-2.0, -2.0], [" a", " b"], gold=1) == {"acc": 0.0, "acc_norm": 0.0}
    # a longer continuation with a lower total log-likelihood wins once normalised by characters
    assert choice_scores([-4.0, -3.0], [" long answer", " ab"], gold=0) == {"acc": 0.0, "acc_norm": 1.0}
    # the one-space delimiter is not counted (lm-evaluation-harness divides by the choice's own length):
    # -2/2 = -1.0 beats -2.9/3 = -0.97 only if " ab" counts 2 characters, not 3
    assert choice_scores([-2.9, -2.0], [" abc", " ab"], gold=1) == {"acc": 1.0, "acc_norm": 0.0}
    assert choice_scores([-3.1, -2.0], [" abc", " ab"], gold=0) == {"acc": 0.0, "acc_norm": 0.0}
    # bytes and characters disagree on Japanese: 3 chars = 9 UTF-8 bytes
    lps, conts = [-3.0, -1.9], ["マザー", "ab"]
    assert choice_scores(lps, conts, gold=0, unit="chars")["acc_norm"] == 0.0  # -1.0 < -0.95
    assert choice_scores(lps, conts, gold=0, unit="bytes")["acc_norm"] == 1.0  # -0.33 > -0.95
    with pytest.raises(ValueError, match="non-empty"):
        choice_scores([-1.0, -1.0], ["", "x"], gold=0)


def test_answer_normalisation_exact_match_and_char_f1():
    assert normalize_answer("The  Eiffel Tower!", "en") == "eiffel tower"
    assert exact_match("an eiffel tower.", ["The Eiffel Tower"], "en") == 1.0
    assert exact_match("Eiffel", ["The Eiffel Tower"], "en") == 0.0
    assert normalize_answer("「小笠原 諸島」。", "ja") == "小笠原諸島"
    assert normalize_answer("ＡＢＣ１２３", "ja") == "abc123"  # NFKC: full-width to ASCII
    assert exact_match("小笠原諸島。", ["東京", "小笠原諸島"], "ja") == 1.0
    assert char_f1("小笠原", ["小笠原諸島"], "ja") == pytest.approx(2 * 1.0 * 0.6 / 1.6)
    assert char_f1("", ["東京"], "ja") == 0.0 and char_f1("北海道", ["東京"], "ja") == 0.0
    assert char_f1("東京都", ["京都", "東京都"], "ja") == 1.0  # best over the answers


def test_number_extraction():
    assert extract_number("The answer is 1,234.5 dollars, not 7") == 7.0
    assert extract_number("答えは１８個です") == 18.0 and extract_number("no digits") is None
    assert numeric_match(" 18", ["18"]) == 1.0 and numeric_match("-3", ["3"]) == 0.0
    assert numeric_match("$1,000", ["1000"]) == 1.0 and numeric_match("18.0", ["18"]) == 1.0


def test_fewshot_is_deterministic_and_never_uses_the_item_itself():
    loaded = load_task(TASKS["boolq"], DEFAULT_DATA_DIR)
    item = loaded.items[0]
    a, b = with_fewshot(loaded, item, 3, seed=1), with_fewshot(loaded, item, 3, seed=1)
    assert a == b and a.contexts[0].endswith(item.contexts[0]) and a.contexts[0].count("\nAnswer:") == 4
    for k in range(1, 4):
        assert with_fewshot(loaded, item, 3, seed=k).contexts[0].count(item.contexts[0]) == 1
    assert with_fewshot(loaded, item, 3, seed=2) != a
    # a train split serves as the pool when there is one: JCommonsenseQA's shots come from train.jsonl
    jc = load_task(TASKS["jcommonsenseqa"], DEFAULT_DATA_DIR)
    shot = with_fewshot(jc, jc.items[0], 1, seed=0).contexts[0].split("\n\n")[0]
    assert shot in {p.demonstration() for p in jc.pool} and shot not in {i.demonstration() for i in jc.items}
    with pytest.raises(ValueError, match="only 10 are available"):
        with_fewshot(jc, jc.items[0], 11, seed=0)


def test_fewshot_results_do_not_depend_on_limit_or_batch_size(tok):
    model = tiny_lm("mamba2", vocab=tok.vocab_size, dtype=torch.float32)
    kw = {"num_fewshot": 2, "progress": False}
    r4 = evaluate_model(model, tok, "piqa,jnli", limit=4, batch_size=3, **kw)["tasks"]
    assert r4["jnli"]["fewshot_from"] == "the eval split itself" and r4["jnli"]["counts"]["scored"] == 4
    # an item's shots come from its own seed, so they are the same whatever --limit selects
    loaded = load_task(TASKS["piqa"], DEFAULT_DATA_DIR)
    short = type(loaded)(loaded.task, loaded.items[:2], 2, pool=loaded.pool)
    assert with_fewshot(short, loaded.items[1], 2, 1234) == with_fewshot(loaded, loaded.items[1], 2, 1234)
    again = evaluate_model(model, tok, "piqa,jnli", limit=4, batch_size=1, **kw)["tasks"]
    for name in ("piqa", "jnli"):
        assert again[name]["metrics"] == pytest.approx(r4[name]["metrics"])
