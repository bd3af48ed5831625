"""The memory family inside the decoder LM (GLA, Gated DeltaNet, Mixture-of-Memories, FM and Mamba-2 + Memory Caching,
a hybrid of them all): document isolation at the logits, cached decoding and generation, the balancing loss, FLOPs."""

import math

import pytest
import torch

from fm_pretrain.config import from_dict
from fm_pretrain.model import DecoderLM
from fm_pretrain.model.flops import recurrence_flops_forward, training_flops_per_token
from tests.helpers.mixer_checks import check_lm_cached_decoding

MODELS = {
    "gla": dict(layer_pattern=["gla"]),
    "gated_delta": dict(layer_pattern=["gated_delta"]),
    "mom_gla": dict(layer_pattern=["mom"]),
    "mom_delta": dict(
        layer_pattern=["mom"],
        mom=dict(n_memories=4, top_k=2, inner="gated_delta", n_heads=2, d_key=8, d_value=8, chunk_size=4),
    ),  # fmt: skip
    "fm_mc": dict(layer_pattern=["fm"], memory_caching=dict(mixers=["fm"], aggregation="ssc", segment_size=4)),
    "mamba2_mc": dict(layer_pattern=["mamba2"], memory_caching=dict(mixers=["mamba2"], segment_size=4)),
    "mom_mc": dict(layer_pattern=["mom"], memory_caching=dict(mixers=["mom"], aggregation="ssc", segment_size=8)),
    "hybrid": dict(
        layer_pattern=["gla", "gated_delta", "mom", "fm"],
        memory_caching=dict(mixers=["fm", "gla"], aggregation="grm", segment_size=4),
    ),  # fmt: skip
}


def tiny_lm(name: str) -> DecoderLM:
    model = {
        "vocab_size": 64,
        "d_model": 32,
        "n_layers": 4,
        "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": 3, "chunk_size": 4},
        "gla": {"n_heads": 2, "d_key": 8, "d_value": 8, "chunk_size": 4},
        "gated_delta": {"n_heads": 2, "d_key": 8, "d_value": 8, "chunk_size": 4},
        "mom": {"n_memories": 4, "top_k": 2, "n_heads": 2, "d_key": 8, "d_value": 8, "chunk_size": 4},
        "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 4},
        **MODELS[name],
    }
    torch.manual_seed(0)
    return DecoderLM(from_dict({"model": model}).model).double().eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_changing_document_a_leaves_document_b_logits_unchanged(name):
    """Bit for bit, except with MoM: there a memory's projection is one matmul over the tokens of every document
    routed to it, and the BLAS result of a row may depend on how many rows the matmul has (1e-16 in fp64); the
    scans themselves are exact (each document starts on a chunk boundary of its memory's sequence)."""
    lm = tiny_lm(name)
    same = dict(rtol=0, atol=1e-12 if "mom" in MODELS[name]["layer_pattern"] else 0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 19), generator=gen)
    doc_ids = torch.tensor([[0] * 8 + [1] * 11, [0] * 3 + [1] * 9 + [2] * 7])
    logits = lm(ids, doc_ids).logits
    changed = ids.clone()
    changed[0, :8] = torch.randint(0, 64, (8,), generator=gen)
    changed[1, 3:12] = torch.randint(0, 64, (9,), generator=gen)
    new = lm(changed, doc_ids).logits
    torch.testing.assert_close(new[0, 8:], logits[0, 8:], **same)
    torch.testing.assert_close(new[1, :3], logits[1, :3], **same)
    torch.testing.assert_close(new[1, 12:], logits[1, 12:], **same)
    assert not torch.allclose(new[0, :8], logits[0, :8])
    torch.testing.assert_close(lm(ids[:1, 8:]).logits[0], logits[0, 8:], rtol=1e-10, atol=1e-10)
    recurring = torch.tensor([[3] * 6 + [1] * 5 + [3] * 8] * 2)  # ids that come back start a new document
    increasing = torch.tensor([[0] * 6 + [1] * 5 + [2] * 8] * 2)
    torch.testing.assert_close(lm(ids, recurring).logits, lm(ids, increasing).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_decoding_reproduces_the_parallel_forward(name):
    check_lm_cached_decoding(tiny_lm(name))


def test_generate_is_greedy_continuation_and_left_padding_changes_nothing():
    lm = tiny_lm("hybrid")
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    out = lm.generate(prompt, max_new_tokens=6)
    for t in range(5, 11):
        assert torch.equal(out[:, t], lm(out[:, :t]).logits[:, -1].argmax(-1))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt[1:]], dim=1)  # row 1 alone, left-padded by 3
    both = torch.cat([torch.cat([prompt[:1], prompt[:1, :3]], 1), padded])
    got = lm.generate(both, max_new_tokens=4, start=torch.tensor([0, 3]))
    assert torch.equal(got[1, 8:], out[1, 5:9])


def test_mom_balancing_loss_is_added_to_the_optimised_loss():
    lm = tiny_lm("mom_gla").train()
    ids = torch.randint(0, 64, (2, 9))
    out = lm(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_flop_counts_of_the_new_mixers():
    per_layer = {"gla": 4 * 2 * 8 * 8, "gated_delta": 6 * 2 * 8 * 8, "mom_gla": (2 + 1) * 4 * 2 * 8 * 8,
                 "mom_delta": (2 + 1) * 6 * 2 * 8 * 8}  # fmt: skip
    for name, flops in per_layer.items():
        assert recurrence_flops_forward(tiny_lm(name), 16) == 4 * flops, name
    # MoM: only the k = 2 routed memories' projections of the M = 4 count
    lm = tiny_lm("mom_gla")
    linear = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    unrouted = 4 * (4 - 2) * 32 * 2 * (8 + 8 + 8)
    assert training_flops_per_token(lm, 16) == 3 * (2 * (linear - unrouted) + 4 * per_layer["mom_gla"])
    # FM + SSC at 64 tokens, segments of 4: (16 - 1) / 2 cached segments on average, 2 read, k = 3 rows each
    fm_mc, fm_only = tiny_lm("fm_mc"), tiny_lm("fm_mc")
    fm_only.cfg.memory_caching.mixers = []
    extra = 2 * (2 * 2 * 3 * 8 + 2 * 32 * (7.5 + 1))
    assert math.isclose(recurrence_flops_forward(fm_mc, 64) - recurrence_flops_forward(fm_only, 64), 4 * extra)
