"""Checks every token mixer must pass (shared by the mixer test files): cached decoding reproduces the
parallel forward, and documents packed into one sequence do not see each other; a layer against its reference,
left padding, the in-process head split that tensor parallelism uses, and cached decoding of a whole LM."""

import torch
from torch import nn


def pack_doc_ids(lengths: list[int], batch: int = 1) -> torch.Tensor:
    """(batch, sum(lengths)) doc ids: document i covers lengths[i] consecutive tokens."""
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return ids.expand(batch, -1).clone()


def check_cached_decoding(mixer: nn.Module, x: torch.Tensor, pieces: list[int], atol: float) -> None:
    """Feed x (B, T, d) through a cache in consecutive pieces (e.g. a prefill then single tokens) and
    compare with one parallel forward."""
    assert sum(pieces) == x.shape[1]
    full = mixer(x)
    cache: dict = {}
    outs, t = [], 0
    for n in pieces:
        outs.append(mixer(x[:, t : t + n], cache=cache))
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=atol, rtol=0)


def check_document_isolation(mixer: nn.Module, x: torch.Tensor, lengths: list[int], atol: float) -> None:
    """In a packed sequence, (a) rewriting document 0 leaves every later document's output unchanged,
    (b) every document's output equals running that document alone."""
    doc_ids = pack_doc_ids(lengths, x.shape[0])
    y = mixer(x, doc_ids=doc_ids)
    n0 = lengths[0]
    x2 = x.clone()
    x2[:, :n0] = torch.randn_like(x2[:, :n0])
    y2 = mixer(x2, doc_ids=doc_ids)
    assert not torch.allclose(y2[:, :n0], y[:, :n0])  # the edit reached document 0 at least
    torch.testing.assert_close(y2[:, n0:], y[:, n0:], atol=atol, rtol=0)
    start = 0
    for n in lengths:
        alone = mixer(x[:, start : start + n])
        torch.testing.assert_close(y[:, start : start + n], alone, atol=atol, rtol=0)
        start += n


def check_against_reference(layer: nn.Module, fast, reference, x: torch.Tensor, w: torch.Tensor,
                            nonzero: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """fast(x) and reference(x) (B, T, d) -> y: y, the gradient of sum(y * w) with respect to x and to every parameter
    of `layer` agree (fp64: rtol 1e-9, atol 1e-10; a parameter without a gradient counts as zero). nonzero: every
    reference gradient must be non-zero somewhere (nothing is vacuously equal). Returns the fast path's values by
    name ("y", "d x", "d <parameter>")."""
    results = []
    for fn in (fast, reference):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * w).sum().backward()
        results.append([y, xi.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in layer.parameters()])
    names = ["y", "d x"] + [f"d {n}" for n, _ in layer.named_parameters()]
    for n, got, want in zip(names, *results):
        assert not nonzero or want.abs().max() > 0, n
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda s, n=n: f"{n}: {s}")
    return dict(zip(names, results[0]))


def check_left_padding(mixer: nn.Module, x: torch.Tensor, atol: float) -> None:
    """x (2, 12, d): row 1 left-padded by 5 positions (model/cache.py "start"), fed as a prefill of 3, one of 6 (both
    rows crossing into real tokens at different points) and 3 single tokens: the padded row equals its real tokens
    alone, and the unpadded row equals a plain forward."""
    cache = {"start": torch.tensor([0, 5])}
    y = torch.cat([mixer(x[:, :3], cache=cache), mixer(x[:, 3:9], cache=cache)]
                  + [mixer(x[:, t : t + 1], cache=cache) for t in range(9, 12)], 1)  # fmt: skip
    torch.testing.assert_close(y[1:, 5:], mixer(x[1:, 5:]), rtol=atol, atol=atol)
    torch.testing.assert_close(y[:1], mixer(x[:1]), rtol=atol, atol=atol)


def run_head_split(full: nn.Module, parts: list[nn.Module], d: int) -> None:
    """The in-process form of tensor parallelism: `parts` hold the heads of `full` between them (weights copied by
    the caller). On x (2, 9, d) with two documents in row 0, the parts' outputs sum to the full layer's and so does
    x's gradient; the parameter gradients are left in `.grad` for the caller to compare piece by piece."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, d, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 9, d, dtype=torch.float64, generator=gen)
    doc = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = full(xa, doc), sum(part(xb, doc) for part in parts)
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-12)


def check_one_segment_is_the_base(layer: nn.Module, d: int) -> None:
    """Memory Caching with a segment longer than the sequence caches nothing: the wrapper equals its base mixer on
    x (2, 13, d) with two documents in row 0."""
    x = torch.randn(2, 13, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    doc = torch.tensor([[0] * 4 + [1] * 9, [0] * 13])
    torch.testing.assert_close(layer(x, doc), layer.base(x, doc), rtol=1e-10, atol=1e-10)


def check_caching_decoding(layer: nn.Module, d: int, segmentation: str) -> dict:
    """A Memory Caching layer with segments of 4 on x (2, 14, d): cached decoding (a prefill then single tokens, and
    a prefill continued in pieces) == the parallel forward, documents isolated, and while decoding the cache holds
    one more state per completed segment (log: one per bit level, `segments.n_slots`). Returns the final cache."""
    from fm_kernels.caching.segments import n_slots

    x = torch.randn(2, 14, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_cached_decoding(layer, x, [6] + [1] * 8, atol=1e-10)
    check_cached_decoding(layer, x, [5, 3, 1, 5], atol=1e-10)  # a prefill continued in pieces
    check_document_isolation(layer, x, [5, 1, 8], atol=1e-10)
    cache: dict = {}
    layer(x[:, :5], cache=cache)
    sizes = [cache["mc"].cached.shape[1]]
    for t in range(5, 14):
        layer(x[:, t : t + 1], cache=cache)
        sizes.append(cache["mc"].cached.shape[1])
    assert sizes == [max(1, n_slots((t + 1) // 4, segmentation)) for t in range(4, 14)]
    return cache


def check_lm_cached_decoding(lm: nn.Module, vocab: int = 64) -> None:
    """A decoder LM fed a prefill of 6 tokens and then 9 single tokens through its per-layer caches gives the
    logits of one parallel forward over the 15 tokens (2 rows)."""
    ids = torch.randint(0, vocab, (2, 15), generator=torch.Generator().manual_seed(2))
    full = lm(ids).logits
    caches = [{} for _ in lm.blocks]
    pieces = [lm(ids[:, :6], caches=caches).logits] + [
        lm(ids[:, t : t + 1], caches=caches).logits for t in range(6, 15)
    ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)


def random_docs(B: int, T: int, n_bounds: int, gen: torch.Generator) -> torch.Tensor:
    """Nondecreasing document ids with up to n_bounds random boundaries per row."""
    starts = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        pos = torch.randperm(T - 1, generator=gen)[:n_bounds] + 1
        starts[b, pos] = 1
    return starts.cumsum(1)
