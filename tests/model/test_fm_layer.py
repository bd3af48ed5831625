"""The FM mixer as an nn.Module: options, decoding with a cache, document isolation, balancing loss, and the
sparse gates (top-k and rates only at the routed rows) against the dense formulation, with tensor parallelism."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fm_kernels.fm import fm_recurrence, naive_fm
from fm_pretrain.config import FMConfig
from fm_pretrain.model.layers.fm import FactorizationMemory, at_least_fp32, load_balancing_loss, route

OPTIONS = [
    dict(top_k=None),
    dict(top_k=1),
    dict(top_k=3, rate_per_row=False),
    dict(top_k=8, output_gate=True),  # k = m
    dict(top_k=2, tau=0.5, output_gate=True, rate_bias_init=-1.0),
]


def make_layer(**opts) -> FactorizationMemory:
    cfg = FMConfig(n_heads=2, n_memories=8, d_mem=4, chunk_size=4, **opts)
    torch.manual_seed(0)
    return FactorizationMemory(16, cfg, layer_idx=0).double()


@pytest.mark.parametrize("opts", OPTIONS)
def test_layer_matches_reference_recurrence(opts):
    """The layer's read-out equals naive_fm applied to the layer's own gates (spec steps 1-7)."""
    layer = make_layer(**opts)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    gates = layer._gates(x)
    theta, phi = gates.dense_weights(layer.n_memories)  # (B, H, T, m), zero outside the routed rows
    r_ref, _ = naive_fm(theta, phi, gates.xbar, doc)
    torch.testing.assert_close(layer(x, doc), layer._output(r_ref, x), rtol=1e-10, atol=1e-10)
    # Sparse routing writes and reads at most k rows per token.
    k = opts["top_k"] or 8
    assert int((theta != 0).sum(-1).max()) <= k and int((phi != 0).sum(-1).max()) <= k


@pytest.mark.parametrize("opts", OPTIONS)
def test_cached_decoding_reproduces_parallel(opts):
    layer = make_layer(**opts).eval()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    full = layer(x)
    cache: dict = {}
    parts = [layer(x[:, :6], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_documents_are_isolated():
    layer = make_layer(top_k=3)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    y = layer(x, doc)
    x2 = x.clone()
    x2[:, :7] = torch.randn(1, 7, 16, dtype=torch.float64)  # change document A only
    y2 = layer(x2, doc)
    torch.testing.assert_close(y2[:, 7:], y[:, 7:], rtol=0, atol=0)
    torch.testing.assert_close(layer(x[:, 7:]), y[:, 7:], rtol=1e-12, atol=1e-12)  # B as if alone
    assert not torch.allclose(y2[:, :7], y[:, :7])


def test_route_topk_renormalises():
    logits = torch.randn(3, 5, 10)
    a, alpha, rows = route(logits, 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 5))
    assert rows.shape == (3, 5, 4) and int((a > 0).sum(-1).max()) == 4
    torch.testing.assert_close(alpha, torch.softmax(logits, -1))


def test_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    m, H = 8, 2
    uniform = torch.full((64, H, m), 1.0 / m)
    rows = torch.arange(64).remainder(m).view(64, 1, 1).expand(64, H, 1)
    assert torch.isclose(load_balancing_loss(uniform, rows, 1), torch.tensor(1.0))
    collapsed = torch.zeros(64, H, m)
    collapsed[..., 0] = 1.0
    assert load_balancing_loss(collapsed, torch.zeros(64, H, 1, dtype=torch.long), 1) > 7.9


def test_aux_loss_only_when_enabled_and_training():
    layer = make_layer(top_k=2, aux_loss_weight=0.01)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    layer(x)
    assert layer.aux_loss is not None and layer.aux_loss > 0
    layer.aux_loss.backward()
    assert layer.w_alpha.weight.grad is not None and layer.w_alpha.weight.grad.abs().sum() > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


# ---- sparse gates: top-k and rates only at the routed rows == the dense formulation ----------------------


def gates_dense_formulation(layer: FactorizationMemory, x: torch.Tensor):
    """The gates as the spec reads (and as the layer formed them before gathering): softmax over all m rows,
    top-k renormalised and zero-filled, rates for all m rows. theta, phi (B, H, T, m); alpha (B, T, H, m);
    rows (B, T, H, k) or None."""
    B, T, _ = x.shape
    H, m = layer.n_heads, layer.n_memories
    logits = layer.w_alpha(x).view(B, T, H, m) / layer.cfg.tau
    a, alpha, rows = route(logits, layer.top_k)
    eta = torch.sigmoid(at_least_fp32(layer.w_eta(x) + layer.b_eta)).view(B, T, H, -1)
    mu = torch.sigmoid(at_least_fp32(layer.w_mu(x) + layer.b_mu)).view(B, T, H, -1)
    xbar = layer.w_i(x).view(B, T, H, layer.d_mem).transpose(1, 2)
    return (eta * a).transpose(1, 2), (mu * a).transpose(1, 2), xbar, alpha, rows


def forward_dense_formulation(layer: FactorizationMemory, x: torch.Tensor, doc: torch.Tensor):
    """y (B, T, d) and the weighted balancing loss (or None) from the dense-formulation gates (PyTorch path)."""
    theta, phi, xbar, alpha, rows = gates_dense_formulation(layer, x)
    r, _ = fm_recurrence(theta=theta, phi=phi, xbar=xbar, doc_ids=doc, chunk_size=layer.cfg.chunk_size)
    aux = None
    if layer.training and layer.cfg.aux_loss_weight > 0:
        aux = layer.cfg.aux_loss_weight * load_balancing_loss(alpha, rows, layer.top_k or layer.n_memories)
    return layer._output(r, x), aux


def randomise(layer: FactorizationMemory, seed: int) -> FactorizationMemory:
    """Random weights of a useful scale (rate biases and norm weights included), so no gradient is trivially 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=gen) * (0.5 if p.dim() > 1 else 1.0))
    return layer


SPARSE_GATES = [  # m = 8
    dict(top_k=1),
    dict(top_k=7),  # k = m - 1
    dict(top_k=1, rate_per_row=False),
    dict(top_k=7, rate_per_row=False, tau=0.6),
    dict(top_k=3, aux_loss_weight=0.1, output_gate=True),
    dict(top_k=7, aux_loss_weight=0.1, tau=1.7),
    dict(top_k=1, aux_loss_weight=0.1, rate_per_row=False),
]


@pytest.mark.parametrize("opts", SPARSE_GATES)
def test_sparse_gates_equal_dense_formulation(opts):
    """Routing fields, output, balancing loss and every gradient (parameters and x) == the dense formulation."""
    layer = randomise(make_layer(**opts), 1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 16, dtype=torch.float64, generator=gen)
    doc = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    with_loss = layer.cfg.aux_loss_weight > 0

    g = layer._gates(x, with_alpha=with_loss)
    theta, phi, xbar, alpha, rows = gates_dense_formulation(layer, x)
    k = layer.top_k
    assert g.rows.shape == g.theta.shape == g.phi.shape == (2, 2, 11, k)
    assert g.a.shape == (2, 11, 2, k) and g.eta.shape == g.mu.shape == (2, 11, 2, k if layer.cfg.rate_per_row else 1)
    assert torch.equal(g.rows, rows.transpose(1, 2))
    dense_theta, dense_phi = g.dense_weights(layer.n_memories)
    torch.testing.assert_close(dense_theta, theta, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(dense_phi, phi, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(g.xbar, xbar, rtol=0, atol=0)
    if with_loss:
        torch.testing.assert_close(g.alpha, alpha, rtol=0, atol=0)
    else:
        assert g.alpha is None  # not formed

    w = torch.randn(2, 11, 16, dtype=torch.float64, generator=gen)
    results = []
    for run in (lambda xi: (layer(xi, doc), layer.aux_loss), lambda xi: forward_dense_formulation(layer, xi, doc)):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, aux = run(xi)
        assert (aux is not None) == with_loss
        ((y * w).sum() + (aux if aux is not None else 0)).backward()
        results.append([y, aux if aux is not None else torch.zeros(()), xi.grad] + [p.grad for p in layer.parameters()])
    names = ["y", "aux", "d x"] + [f"d {n}" for n, _ in layer.named_parameters()]
    # Zero by construction: the loss when off, and the router's gradient at k = 1 without the loss (one kept
    # row always has weight exactly 1).
    zero = {"aux"} if not with_loss else set()
    if k == 1 and not with_loss:
        zero.add("d w_alpha.weight")
    for name, got, want in zip(names, *results):
        assert (want.abs().max() < 1e-12) == (name in zero), name  # (the dense formulation rounds to ~1e-16)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("opts", [dict(top_k=3), dict(top_k=7, tau=0.6, rate_bias_init=-1.0), dict(top_k=1)])
def test_single_token_rates_from_the_full_projection_equal_the_gathered(opts, monkeypatch):
    """The decode step's rates (T = 1: the full projection W x + b, then the k routed values) == the gathered
    rates of `linear_at_rows` at the same rows, and == the T > 1 gates at that token, fp64 tight, with equal
    gradients; only T > 1 calls linear_at_rows."""
    import fm_pretrain.model.layers.fm as fm_module

    layer = randomise(make_layer(**opts), 4)
    B, T, H, m, k = 3, 5, layer.n_heads, layer.n_memories, layer.top_k
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(B, T, 16, dtype=torch.float64, generator=gen)
    calls = []
    gathered = fm_module.linear_at_rows
    monkeypatch.setattr(fm_module, "linear_at_rows", lambda **kw: calls.append(kw["index"].shape) or gathered(**kw))
    seq = layer._gates(x)
    assert len(calls) == 2  # eta and mu over T = 5 tokens: the gathered path
    for t in range(T):
        calls.clear()
        xt = x[:, t : t + 1].clone().requires_grad_(True)
        one = layer._gates(xt)
        assert calls == [], "a single token must not gather weight rows"
        assert torch.equal(one.rows, seq.rows[:, :, t : t + 1])
        index = (one.rows.transpose(1, 2) + torch.arange(H).view(1, 1, H, 1) * m).reshape(B, 1, H * k)
        for name in ("eta", "mu"):
            rate, w, b = getattr(one, name), getattr(layer, f"w_{name}").weight, getattr(layer, f"b_{name}")
            ref = torch.sigmoid(gathered(x=xt, weight=w, index=index, bias=b)).view(B, 1, H, k)
            assert rate.shape == (B, 1, H, k)
            torch.testing.assert_close(rate, ref, rtol=1e-14, atol=1e-15, msg=lambda s, n=name: f"{n}: {s}")
            torch.testing.assert_close(rate, getattr(seq, name)[:, t : t + 1], rtol=1e-14, atol=1e-15)
            v = torch.randn(rate.shape, dtype=torch.float64, generator=gen)
            got = torch.autograd.grad((rate * v).sum(), (xt, w, b))
            want = torch.autograd.grad((ref * v).sum(), (xt, w, b))
            for g_got, g_want in zip(got, want):
                torch.testing.assert_close(g_got, g_want, rtol=1e-13, atol=1e-15, msg=lambda s, n=name: f"d{n}: {s}")
        torch.testing.assert_close(one.theta, seq.theta[:, :, t : t + 1], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(one.phi, seq.phi[:, :, t : t + 1], rtol=1e-14, atol=1e-15)


def split_heads(full: FactorizationMemory, n_parts: int) -> list[FactorizationMemory]:
    """Layers of n_heads / n_parts heads holding the full layer's head slices, as tensor parallelism splits it:
    W_alpha, W_eta, W_mu, W_i, W_gate, b_eta, b_mu and the read norm by head (dim 0), W_o by its input (dim 1)."""
    cfg = full.cfg
    sub = FMConfig(**{**cfg.__dict__, "n_heads": cfg.n_heads // n_parts})
    parts = [FactorizationMemory(16, sub).double() for _ in range(n_parts)]
    for name, p in full.named_parameters():
        for i, part in enumerate(parts):
            dim = 1 if name.startswith("w_o.") else 0
            part.get_parameter(name).data.copy_(p.detach().chunk(n_parts, dim=dim)[i])
    return parts


@pytest.mark.parametrize("opts", [dict(top_k=3), dict(top_k=7, aux_loss_weight=0.1, output_gate=True)])
def test_sparse_gates_split_by_head(opts):
    """The tensor-parallel split in one process: two half-head layers (sums of their outputs, balancing losses
    averaged) == the full layer, with every gradient: gathered rates index each rank's own heads."""
    cfg = FMConfig(n_heads=4, n_memories=8, d_mem=4, chunk_size=4, **opts)
    torch.manual_seed(0)
    full = randomise(FactorizationMemory(16, cfg).double(), 3)
    parts = split_heads(full, 2)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    w = torch.randn(2, 9, 16, dtype=torch.float64)

    def loss_and_grads(layers):
        xi = x.clone().requires_grad_(True)
        y = sum(layer(xi) for layer in layers)
        aux = [layer.aux_loss for layer in layers]
        loss = (y * w).sum() + (sum(aux) / len(aux) if aux[0] is not None else 0)
        loss.backward()
        return loss, xi.grad

    loss, dx = loss_and_grads([full])
    loss_p, dx_p = loss_and_grads(parts)
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_p, dx, rtol=1e-10, atol=1e-12)
    for name, p in full.named_parameters():
        dim = 1 if name.startswith("w_o.") else 0
        got = torch.cat([part.get_parameter(name).grad for part in parts], dim=dim)
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12, msg=lambda s, n=name: f"d {n}: {s}")


def _tp2_worker(rank: int, store: str, opts: dict) -> None:
    """One of 2 ranks: a TP = 2 layer (megatron-core column/row layers over gloo) against the TP = 1 layer."""
    from fm_pretrain.parallel.state import (
        destroy_model_parallel,
        gather_full,
        initialize_model_parallel,
        load_full_state_dict,
    )

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        initialize_model_parallel(2)
        cfg = FMConfig(n_heads=4, n_memories=8, d_mem=4, chunk_size=4, **opts)
        torch.manual_seed(0)
        full = FactorizationMemory(16, cfg)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in full.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        tp_layer = FactorizationMemory(16, cfg, tp=2)
        load_full_state_dict(tp_layer, full.state_dict())
        x = torch.randn(2, 9, 16, generator=gen)
        w = torch.randn(2, 9, 16, generator=gen)
        doc = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
        out = []
        for layer in (full, tp_layer):
            xi = x.clone().requires_grad_(True)
            y = layer(xi, doc)
            loss = (y * w).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
            loss.backward()
            out.append((y, loss, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
        (y1, l1, dx1, g1), (y2, l2, dx2, g2) = out
        g2 = gather_full(tp_layer, g2)
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx2, dx1, rtol=1e-5, atol=1e-5)  # x's gradient is all-reduced over TP
        for name, grad in g1.items():
            torch.testing.assert_close(g2[name], grad, rtol=1e-5, atol=1e-5, msg=lambda s, n=name: f"d {n}: {s}")
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("opts", [dict(top_k=3, aux_loss_weight=0.1), dict(top_k=2, output_gate=True)])
def test_sparse_gates_under_real_tensor_parallelism(tmp_path, opts):
    """2 processes, megatron-core TP = 2 on gloo: per-row gathered rates give the TP = 1 output, loss and every
    gradient, x's included (its all-reduce over the TP group covers the gathered rates too)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mp.spawn(_tp2_worker, args=(str(tmp_path / "store"), opts), nprocs=2, join=True)
