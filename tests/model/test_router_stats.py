"""Router statistics (fm_pretrain/model/router_stats.py) on planted routers whose statistics are known."""

import math

import pytest
import torch
from matplotlib.image import imread

from fm_pretrain.model.router_stats import (
    ROUTER_STATS,
    RouterStatsAccumulator,
    metric_key,
    plot_usage_heatmap,
    routing_entropy,
)

N, H, M = 64, 3, 8  # tokens, heads, memory rows


def stats_of(acc: RouterStatsAccumulator, layer: int = 0) -> dict[str, float]:
    return {s: v for s, v in ((k.split("/")[-1], v) for k, v in acc.compute().items() if f"/layer{layer}/" in k)}


def test_collapsed_dense_router_has_zero_entropy_and_m_minus_1_dead_rows():
    w = torch.zeros(2, N // 2, H, M)
    w[..., 5] = 1.0  # every token of every head to row 5
    acc = RouterStatsAccumulator([0], H, M)
    acc.update(0, w)
    s = stats_of(acc)
    assert s == {"entropy": 0.0, "dead_rows": M - 1, "max_load": 1.0, "mean_load": 1.0}


def test_uniform_dense_router_has_log_m_entropy_and_no_dead_rows():
    acc = RouterStatsAccumulator([0], H, M)
    acc.update(0, torch.full((N, H, M), 1.0 / M))
    s = stats_of(acc)
    assert s["entropy"] == pytest.approx(math.log(M), rel=1e-6)
    assert s["dead_rows"] == 0.0
    assert s["max_load"] == pytest.approx(1 / M) and s["mean_load"] == pytest.approx(1 / M)


def test_sparse_routers_through_the_fm_layers_route():
    from fm_pretrain.model.layers.fm import route

    k = 2
    # collapsed: every token prefers rows 0 and 1 by far, so top-2 keeps only them
    logits = torch.full((N, H, M), -30.0)
    logits[..., 0], logits[..., 1] = 10.0, 10.0
    a, _, rows = route(logits, k)
    acc = RouterStatsAccumulator([0], H, M)
    acc.update(0, a, rows)
    s = stats_of(acc)
    assert s["dead_rows"] == M - k and s["entropy"] == pytest.approx(math.log(k), rel=1e-6)
    assert s["max_load"] == pytest.approx(0.5) and s["mean_load"] == pytest.approx(0.5)
    # spread: token t prefers rows t mod m and t+1 mod m equally; over 64 tokens every row is kept
    logits = torch.full((N, H, M), -30.0)
    for t in range(N):
        logits[t, :, t % M] = logits[t, :, (t + 1) % M] = 10.0
    a, _, rows = route(logits, k)
    acc.update(0, a, rows)
    s = stats_of(acc)
    assert s["dead_rows"] == 0 and s["entropy"] == pytest.approx(math.log(k), rel=1e-6)
    assert s["max_load"] == pytest.approx(1 / M) and s["mean_load"] == pytest.approx(1 / M)
    # the same weights without the indices: zeros outside the kept rows read as not selected
    acc.update(0, a)
    assert stats_of(acc)["dead_rows"] == 0


def test_the_sparse_layers_k_weights_at_their_rows_give_the_same_window_as_the_m_wide_weights():
    """The FM layer's sparse path hands over (..., H, k) weights and their rows (no (..., m) tensor): same stats."""
    from fm_pretrain.model.layers.fm import route

    gen = torch.Generator().manual_seed(3)
    for k in (1, 3, M - 1):
        logits = torch.randn(N, H, M, generator=gen) * 3
        a, _, rows = route(logits, k)
        wide, narrow = RouterStatsAccumulator([0], H, M), RouterStatsAccumulator([0], H, M)
        mask = torch.rand(N, generator=gen) > 0.3
        wide.update(0, a, rows, mask)
        narrow.update(0, a.gather(-1, rows), rows, mask)
        got, want = stats_of(narrow), stats_of(wide)
        assert got == pytest.approx(want, rel=1e-6)  # the weights are summed in fp32, in another order
        assert got["dead_rows"] == want["dead_rows"]
        assert torch.allclose(narrow.usage(), wide.usage(), rtol=1e-6, atol=1e-9)


def test_window_accumulates_over_updates_resets_and_masks_tokens():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(4, 16, H, M) * 3, dim=-1)
    whole = RouterStatsAccumulator([2, 5], H, M)
    whole.update(2, w)
    pieces = RouterStatsAccumulator([2, 5], H, M)
    for part in w:
        pieces.update(2, part)
    expected = whole.compute()
    assert set(expected) == {metric_key(2, s) for s in ROUTER_STATS}  # layer 5 saw no tokens: left out
    for key, value in pieces.compute().items():
        assert value == pytest.approx(expected[key], rel=1e-6), key  # fp32 sums inside each update
    assert pieces.compute() == {}  # compute() reset the window

    # a masked-out token is not counted: only it sent weight to row 7, so row 7 is dead
    w = torch.full((N, H, M), 0.0)
    w[:, :, 0] = 1.0
    w[3, :, :] = 0.0
    w[3, :, 7] = 1.0
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    acc = RouterStatsAccumulator([0], H, M)
    acc.update(0, w, mask=mask)
    assert stats_of(acc)["dead_rows"] == M - 1
    acc.update(0, w)
    assert stats_of(acc)["dead_rows"] == M - 2


def test_entropy_of_a_known_distribution():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    assert routing_entropy(p).item() == pytest.approx(1.5 * math.log(2))


def test_bad_input_is_named():
    acc = RouterStatsAccumulator([0, 2], H, M)
    with pytest.raises(ValueError, match=r"layer 2: weights must be \(\.\.\., 3, 8\)"):
        acc.update(2, torch.zeros(N, H, M + 1))
    with pytest.raises(KeyError, match="layer 1 is not one of the tracked layers"):
        acc.update(1, torch.zeros(N, H, M))
    with pytest.raises(ValueError, match="mask has 5 tokens"):
        acc.update(0, torch.zeros(N, H, M), mask=torch.ones(5))
    with pytest.raises(ValueError, match="unknown router statistic"):
        metric_key(0, "nope")
    with pytest.raises(ValueError, match="layers is empty"):
        RouterStatsAccumulator([], H, M)
    with pytest.raises(RuntimeError, match="compute"):
        acc.usage()


def test_usage_heatmap(tmp_path):
    acc = RouterStatsAccumulator([0, 3], H, M)
    w = torch.zeros(N, H, M)
    w[..., 1] = 1.0
    acc.update(0, w)
    acc.update(3, torch.full((N, H, M), 1.0 / M))
    acc.compute()
    usage = acc.usage()
    assert usage.shape == (2, M)
    assert usage[0, 1] == pytest.approx(1.0) and usage[1].tolist() == pytest.approx([1 / M] * M)
    img = imread(plot_usage_heatmap(usage, tmp_path / "usage.png", layers=acc.layers))
    assert img.ndim == 3 and img.shape[0] > 50


@pytest.mark.gpu
def test_update_never_synchronises_with_the_host():
    acc = RouterStatsAccumulator([0], H, M, device="cuda")
    w = torch.softmax(torch.randn(N, H, M, device="cuda"), -1)
    rows = w.topk(2, dim=-1).indices
    mask = torch.ones(N, device="cuda", dtype=torch.bool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            acc.update(0, w)
            acc.update(0, w, rows, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats_of(acc)["dead_rows"] == 0
