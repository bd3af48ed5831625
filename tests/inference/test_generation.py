"""Batched generation against per-prompt references, for every mixer and a hybrid: a left-padded batch generates
what each prompt generates alone (and what a cache-free loop of full forwards generates); chunked prefill equals
one-shot prefill at several chunk sizes; sampling filters equal their per-row references; seeds reproduce."""

import pytest
import torch

from fm_pretrain.inference import (
    SamplingParams,
    generate_reference,
    generate_tokens,
    iter_prefill,
    left_pad,
    new_caches,
    prefill,
    repeat_caches,
)
from fm_pretrain.inference.sampling import (
    apply_repetition_penalty,
    repetition_penalty_reference,
    top_k_filter,
    top_k_reference,
    top_p_filter,
    top_p_reference,
)

from .tiny_models import PATTERNS, tiny_lm

PROMPTS = [[2, 17, 5, 9, 33, 8, 41], [2], [2, 60, 11, 4, 7, 29, 13, 50, 3, 22, 6, 19], [2, 30, 31, 12]]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_padded_batch_equals_each_prompt_alone(name):
    lm = tiny_lm(name)
    ids, start = left_pad(PROMPTS, pad_id=5)
    assert start.tolist() == [5, 11, 0, 8]
    batched = generate_tokens(lm, ids, 8, start=start)
    for b, p in enumerate(PROMPTS):
        alone = generate_tokens(lm, torch.tensor([p]), 8)
        assert batched.tokens[b].tolist() == alone.tokens[0].tolist(), (name, b)
        assert batched.row(b) == generate_reference(lm, p, 8), (name, b)
    assert len({tuple(t) for t in batched.tokens.tolist()}) > 1  # the rows generate different text
    # The prefill logits too, and a control: the same batch with its pads treated as tokens differs.
    want = torch.stack([lm(torch.tensor([p])).logits[0, -1] for p in PROMPTS])
    torch.testing.assert_close(prefill(lm, ids, new_caches(lm, start)), want, rtol=0, atol=2e-5)
    assert not torch.allclose(prefill(lm, ids, new_caches(lm, None)), want, atol=1e-3)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_chunked_prefill_equals_one_shot(name):
    lm = tiny_lm(name)
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    full = lm(ids).logits
    for C in (1, 4, 5, 16, 23, 64):  # 23 = T, 5 and 16 do not divide it, 64 > T
        caches = new_caches(lm)
        chunks = list(iter_prefill(lm, ids, caches, chunk_size=C))
        assert [s for s, _ in chunks] == list(range(0, 23, C))
        torch.testing.assert_close(torch.cat([x for _, x in chunks], 1), full, rtol=0, atol=2e-5)
        # the carried caches decode the next tokens as the full forward does
        nxt = torch.tensor([[7], [9]])
        step = lm(nxt, caches=caches).logits
        torch.testing.assert_close(step[:, 0], lm(torch.cat([ids, nxt], 1)).logits[:, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["fm_sparse", "hybrid"])
def test_chunked_prefill_of_a_padded_batch_equals_one_shot(name):
    lm = tiny_lm(name)
    ids, start = left_pad(PROMPTS, pad_id=5)
    one_shot = prefill(lm, ids, new_caches(lm, start))
    for C in (1, 3, 8):  # chunks lying wholly in a row's padding (C=1, 3) and straddling it
        torch.testing.assert_close(prefill(lm, ids, new_caches(lm, start), chunk_size=C), one_shot, rtol=0, atol=2e-5)
    want = generate_tokens(lm, ids, 6, start=start).tokens
    assert torch.equal(generate_tokens(lm, ids, 6, start=start, prefill_chunk=3).tokens, want)


def test_sampling_filters_equal_their_references():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=gen, dtype=torch.float64) * 3
    for k in (1, 3, 39, 40):
        torch.testing.assert_close(top_k_filter(logits, k), top_k_reference(logits, k), rtol=0, atol=0)
    for p in (0.01, 0.3, 0.9, 0.999):
        torch.testing.assert_close(top_p_filter(logits, p), top_p_reference(logits, p), rtol=0, atol=0)
    seen_ids = [set(torch.randint(0, 40, (6,), generator=gen).tolist()) for _ in range(5)]
    seen = torch.zeros(5, 40, dtype=torch.bool)
    for b, s in enumerate(seen_ids):
        seen[b, list(s)] = True
    torch.testing.assert_close(
        apply_repetition_penalty(logits, seen, 1.7), repetition_penalty_reference(logits, seen_ids, 1.7), rtol=0, atol=0
    )


def test_sampling_is_reproducible_under_a_seed_and_matches_the_reference():
    lm = tiny_lm("fm_sparse")
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.95, repetition_penalty=1.3)
    ids, start = left_pad(PROMPTS, pad_id=0)

    def run(seed: int) -> list[list[int]]:
        out = generate_tokens(lm, ids, 10, start=start, sampling=params, generator=torch.Generator().manual_seed(seed))
        return [out.row(b) for b in range(len(PROMPTS))]

    assert run(7) == run(7)
    assert run(7) != run(8)
    # One prompt: the cached path draws exactly what the cache-free reference draws from the same seed.
    for p in PROMPTS[:2]:
        got = generate_tokens(lm, torch.tensor([p]), 8, sampling=params, generator=torch.Generator().manual_seed(3))
        want = generate_reference(lm, p, 8, sampling=params, generator=torch.Generator().manual_seed(3))
        assert got.row(0) == want
    # Greedy with a repetition penalty, batched and padded: the seen set excludes the padding.
    greedy_penalty = SamplingParams(repetition_penalty=2.0)
    out = generate_tokens(lm, ids, 6, start=start, sampling=greedy_penalty)
    assert [out.row(b) for b in range(4)] == [generate_reference(lm, p, 6, sampling=greedy_penalty) for p in PROMPTS]


def test_eos_ends_a_row_and_the_others_go_on():
    lm = tiny_lm("fm_dense")
    ids, start = left_pad(PROMPTS, pad_id=0)
    free = generate_tokens(lm, ids, 8, start=start)
    eos = free.tokens[0, 2].item()  # row 0's third token becomes eos
    out = generate_tokens(lm, ids, 8, start=start, eos_id=eos)
    assert out.finish[0] == "eos" and out.row(0) == free.row(0)[: free.row(0).index(eos)]
    for b in range(4):
        assert out.row(b) == generate_reference(lm, PROMPTS[b], 8, eos_id=eos)
        assert out.finish[b] == ("eos" if eos in free.row(b) else "length")


def test_repeated_caches_decode_like_their_source_rows():
    lm = tiny_lm("hybrid")
    ids, start = left_pad(PROMPTS[:2], pad_id=0)
    caches = new_caches(lm, start)
    prefill(lm, ids, caches)
    nxt = torch.tensor([[11], [12]])
    want = lm(nxt, caches=repeat_caches(caches, 1)).logits[:, -1]  # decodes a copy: `caches` stays as it was
    got = lm(nxt.repeat_interleave(3, 0), caches=repeat_caches(caches, 3)).logits[:, -1]
    torch.testing.assert_close(got, want.repeat_interleave(3, 0), rtol=0, atol=1e-5)
