"""The decoder LM: document isolation at the logits for every mixer, cached generation, FLOP count."""

import pytest
import torch

from fm_pretrain.config import from_dict
from fm_pretrain.model import DecoderLM
from fm_pretrain.model.flops import recurrence_flops_forward, training_flops_per_token
from tests.helpers.mixer_checks import check_lm_cached_decoding

PATTERNS = {
    "fm_dense": ["fm"],
    "fm_sparse": ["fm"],
    "attention": ["attention"],
    "mamba2": ["mamba2"],
    "hybrid": ["fm", "attention", "mamba2"],
}


def tiny_lm(name: str, **model_overrides) -> DecoderLM:
    model = {
        "vocab_size": 64,
        "d_model": 32,
        "n_layers": 3,
        "layer_pattern": PATTERNS[name],
        "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": 3 if name != "fm_dense" else None, "chunk_size": 4},
        "attention": {"n_heads": 4, "n_kv_heads": 2},
        "mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 4},
        **model_overrides,
    }
    torch.manual_seed(0)
    return DecoderLM(from_dict({"model": model}).model).double().eval()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_changing_document_a_leaves_document_b_logits_unchanged(name):
    lm = tiny_lm(name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 19), generator=gen)
    doc_ids = torch.tensor([[0] * 8 + [1] * 11, [0] * 3 + [1] * 9 + [2] * 7])
    logits = lm(ids, doc_ids).logits
    changed = ids.clone()
    changed[0, :8] = torch.randint(0, 64, (8,), generator=gen)  # row 0: rewrite document A
    changed[1, 3:12] = torch.randint(0, 64, (9,), generator=gen)  # row 1: rewrite the middle document
    new = lm(changed, doc_ids).logits
    assert torch.equal(new[0, 8:], logits[0, 8:]) and torch.equal(new[1, :3], logits[1, :3])
    assert torch.equal(new[1, 12:], logits[1, 12:])
    assert not torch.allclose(new[0, :8], logits[0, :8])
    # Document B also equals running it alone from the start of a sequence.
    torch.testing.assert_close(lm(ids[:1, 8:]).logits[0], logits[0, 8:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_document_ids_that_come_back_are_new_documents(name):
    """ids 3 3 3 1 1 1 3 3 3: the last run is a third document for every mixer (attention masks compare ids)."""
    lm = tiny_lm(name)
    ids = torch.randint(0, 64, (1, 18), generator=torch.Generator().manual_seed(3))
    recurring = torch.tensor([[3] * 6 + [1] * 5 + [3] * 7])
    increasing = torch.tensor([[0] * 6 + [1] * 5 + [2] * 7])
    torch.testing.assert_close(lm(ids, recurring).logits, lm(ids, increasing).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cached_decoding_reproduces_the_parallel_forward(name):
    check_lm_cached_decoding(tiny_lm(name))


def test_generate_is_greedy_continuation():
    lm = tiny_lm("hybrid")
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    out = lm.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    for t in range(5, 11):  # each generated token is the argmax of the full forward over what precedes it
        assert torch.equal(out[:, t], lm(out[:, :t]).logits[:, -1].argmax(-1))


def test_tied_embeddings_share_the_weight_and_loss_ignores_masked_labels():
    lm = tiny_lm("fm_sparse", tie_embeddings=True)
    assert lm.lm_head.weight is lm.embed.weight
    ids = torch.randint(0, 64, (1, 10))
    labels = ids.clone()
    labels[0, 5:] = -100
    out = lm(ids, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[0, :5], ids[0, :5])
    torch.testing.assert_close(out.lm_loss, want)


def test_aux_loss_is_added_to_the_optimised_loss():
    lm = tiny_lm("fm_sparse", fm={"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": 2, "aux_loss_weight": 0.5})
    lm.train()
    ids = torch.randint(0, 64, (2, 9))
    out = lm(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_flop_count_scales_with_k_not_m_for_sparse_fm():
    dense = tiny_lm("fm_dense")
    sparse = tiny_lm("fm_sparse")
    # 3 FM layers x 2 heads x 4 FLOPs x rows x d_mem
    assert recurrence_flops_forward(dense, 16) == 3 * 2 * 4 * 8 * 8
    assert recurrence_flops_forward(sparse, 16) == 3 * 2 * 4 * 3 * 8
    linear = sum(m.weight.numel() for m in sparse.modules() if isinstance(m, torch.nn.Linear))
    # the sparse layers compute W_eta and W_mu (d_model 32 -> 2 heads x 8 rows) only at the k = 3 routed rows
    unused = 3 * 2 * 32 * 2 * (8 - 3)
    assert training_flops_per_token(sparse, 16) == 3 * (2 * (linear - unused) + 3 * 2 * 4 * 3 * 8)
    dense_linear = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear))
    assert training_flops_per_token(dense, 16) == 3 * (2 * dense_linear + 3 * 2 * 4 * 8 * 8)
