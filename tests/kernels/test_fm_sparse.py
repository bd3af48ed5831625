"""Sparse FM training: the (token, row)-pair formulation and its Triton kernels against the dense references.

CPU runs use the Triton interpreter (conftest sets TRITON_INTERPRET=1), where every program of the grid
runs one after another: grids are kept to a few dozen programs.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fm_kernels.fm import chunk_fm, fm_recurrence_sparse, naive_fm
from fm_kernels.fm.routing import route
from fm_kernels.fm.sparse import dense_from_sparse, sparse_fm_reference, synthetic_routing
from fm_kernels.fm.sparse_triton import sparse_fm_triton
from fm_pretrain.config import FMConfig
from fm_pretrain.model.layers.fm import FactorizationMemory
from tests.helpers.mixer_checks import random_docs

# Kernel tests run on the GPU when there is one (compiled), else in the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sparse_inputs(B, H, T, m, d_mem, k, dtype, gen):
    """rows (B, H, T, k) from the real top-k router; theta_k, phi_k = rate * routing weight; xbar."""
    logits = torch.randn(B, H, T, m, dtype=torch.float64, generator=gen) * 2
    a, _, rows = route(logits, k if k < m else None)
    if rows is None:  # k = m: every row, in a random order per token
        rows = torch.rand(B, H, T, m, generator=gen).argsort(-1)
    a_k = a.gather(-1, rows)
    theta_k = (torch.rand(B, H, T, k, dtype=torch.float64, generator=gen) * a_k).to(dtype)
    phi_k = (torch.rand(B, H, T, k, dtype=torch.float64, generator=gen) * a_k).to(dtype)
    xbar = torch.randn(B, H, T, d_mem, dtype=torch.float64, generator=gen).to(dtype)
    return [rows, theta_k, phi_k, xbar]


def run_with_grads(fn, rows, leaves, doc, m, w_r, w_f, **kw):
    """Forward with initial state and final state, backward of a random projection of both outputs."""
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    r, f = fn(rows, *leaves[:3], m, doc, leaves[3], output_final_state=True, **kw)
    ((r.double() * w_r).sum() + (f.double() * w_f).sum()).backward()
    return [r, f] + [x.grad for x in leaves]


def dense_chunk(rows, theta_k, phi_k, xbar, m, doc, s0, output_final_state, chunk_size=8):
    """The dense chunked PyTorch path on the zero-filled weights (gradients flow back through the scatter)."""
    theta, phi = dense_from_sparse(rows, theta_k, m), dense_from_sparse(rows, phi_k, m)
    return chunk_fm(theta, phi, xbar, doc, s0, output_final_state, chunk_size)


REF_CASES = [  # (H, m, k, d_mem, T)
    (2, 8, 1, 4, 21),  # k = 1
    (2, 6, 6, 3, 13),  # k = m
    (3, 16, 4, 8, 33),
    (1, 64, 2, 4, 9),  # many rows never written
]


@pytest.mark.parametrize("H,m,k,d_mem,T", REF_CASES)
@pytest.mark.parametrize("n_bounds", [0, 3])
def test_reference_matches_naive_fp64(H, m, k, d_mem, T, n_bounds):
    gen = torch.Generator().manual_seed(100 * m + 10 * k + T + n_bounds)
    rows, theta_k, phi_k, xbar = sparse_inputs(2, H, T, m, d_mem, k, torch.float64, gen)
    doc = random_docs(2, T, n_bounds, gen)
    s0 = torch.randn(2, H, m, d_mem, dtype=torch.float64, generator=gen)
    theta, phi = dense_from_sparse(rows, theta_k, m), dense_from_sparse(rows, phi_k, m)
    r_ref, f_ref = naive_fm(theta, phi, xbar, doc, s0, output_final_state=True)
    r, f = sparse_fm_reference(rows, theta_k, phi_k, xbar, m, doc, s0, output_final_state=True)
    torch.testing.assert_close(r, r_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-12)


def test_reference_gradients_match_naive_fp64():
    gen = torch.Generator().manual_seed(7)
    B, H, T, m, k, d = 2, 2, 15, 6, 2, 3
    rows, *base = sparse_inputs(B, H, T, m, d, k, torch.float64, gen)
    base.append(torch.randn(B, H, m, d, dtype=torch.float64, generator=gen))
    doc = random_docs(B, T, 2, gen)
    w_r = torch.randn(B, H, T, d, dtype=torch.float64, generator=gen)
    w_f = torch.randn(B, H, m, d, dtype=torch.float64, generator=gen)

    def naive_sparse(rows, theta_k, phi_k, xbar, m, doc, s0, output_final_state):
        theta, phi = dense_from_sparse(rows, theta_k, m), dense_from_sparse(rows, phi_k, m)
        return naive_fm(theta, phi, xbar, doc, s0, output_final_state)

    got = run_with_grads(sparse_fm_reference, rows, base, doc, m, w_r, w_f)
    want = run_with_grads(naive_sparse, rows, base, doc, m, w_r, w_f)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_reference_rejects_repeated_rows():
    rows = torch.tensor([[[[1, 1]]]])
    theta = torch.full((1, 1, 1, 2), 0.5)
    with pytest.raises(ValueError, match="same row twice"):
        sparse_fm_reference(rows, theta, theta, torch.randn(1, 1, 1, 2), 4)


TRITON_CASES = [  # (B, H, m, k, d_mem, T, docs, block, block_d, overwrite): B*H*m*ceil(d/block_d) programs
    (2, 2, 8, 3, 4, 21, 3, 4, None, False),  # T and segments not multiples of the block
    (2, 1, 8, 1, 4, 19, 2, 8, None, True),  # k = 1, with theta = 1 at every 5th token
    (1, 2, 4, 4, 4, 11, 2, 4, None, False),  # k = m
    (1, 1, 6, 2, 8, 17, 4, 2, 4, False),  # two column tiles per row, several documents
]


@pytest.mark.parametrize("B,H,m,k,d_mem,T,n_bounds,block,block_d,overwrite", TRITON_CASES)
def test_triton_matches_reference_and_dense(B, H, m, k, d_mem, T, n_bounds, block, block_d, overwrite):
    """Forward, final state and every gradient: Triton == sparse reference == dense chunked on masked weights."""
    gen = torch.Generator().manual_seed(10 * m + k + T)
    rows, *base = sparse_inputs(B, H, T, m, d_mem, k, torch.float32, gen)
    if overwrite:  # theta = 1 replaces the row: gradients must stay finite and exact
        base[0][:, :, ::5, 0] = 1.0
    base.append(torch.randn(B, H, m, d_mem, generator=gen))
    doc = random_docs(B, T, n_bounds, gen)
    w_r = torch.randn(B, H, T, d_mem, dtype=torch.float64, generator=gen)
    w_f = torch.randn(B, H, m, d_mem, dtype=torch.float64, generator=gen)
    rows, doc, w_r, w_f, *base = [x.to(DEVICE) for x in (rows, doc, w_r, w_f, *base)]

    got = run_with_grads(sparse_fm_triton, rows, base, doc, m, w_r, w_f, block=block, block_d=block_d)
    ref = run_with_grads(sparse_fm_reference, rows, [x.double() for x in base], doc, m, w_r, w_f)
    dense = run_with_grads(dense_chunk, rows, base, doc, m, w_r, w_f)
    names = ["r", "final", "d theta_k", "d phi_k", "d xbar", "d initial_state"]
    for name, g, want, d in zip(names, got, ref, dense):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5, msg=lambda s, n=name: f"{n}: {s}")
        if overwrite and name == "d theta_k":
            continue  # chunk_fm clamps theta below 1 in its log-decay, which zeroes that part of the gradient
        torch.testing.assert_close(g, d, rtol=1e-4, atol=1e-4, msg=lambda s, n=name: f"{n} vs dense: {s}")


def test_triton_fp64_tight_without_state():
    """No initial or final state, one document: fp64 state math in the kernel matches the reference exactly."""
    gen = torch.Generator().manual_seed(3)
    B, H, T, m, k, d = 1, 2, 13, 5, 2, 4
    rows, *leaves = sparse_inputs(B, H, T, m, d, k, torch.float64, gen)
    w = torch.randn(B, H, T, d, dtype=torch.float64, generator=gen)
    rows, w, *leaves = [x.to(DEVICE) for x in (rows, w, *leaves)]
    outs = []
    for fn in (sparse_fm_triton, sparse_fm_reference):
        xs = [x.clone().requires_grad_(True) for x in leaves]
        r, f = fn(rows, *xs, m)
        assert f is None
        (r * w).sum().backward()
        outs.append([r] + [x.grad for x in xs])
    for g, want in zip(*outs):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


class AllocationRecorder(TorchDispatchMode):
    """Records the byte size of every tensor an aten op returns (allocations, views, the interpreter's copies)."""

    def __init__(self):
        super().__init__()
        self.nbytes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.nbytes.append((str(func), o.numel() * o.element_size()))
        return out


def test_sparse_work_is_independent_of_m():
    """No tensor proportional to T * m * d_mem exists in the sparse op, forward or backward.

    Legitimate sizes are O(T k d_mem) (pair reads, block checkpoints), O(T d_mem) (xbar, r), O(m d_mem) (the
    state) and O(T k + m) (sorted pairs, segment offsets); here T * m * d_mem is 18x even their sum.
    """
    B, H, T, m, k, d = 1, 1, 64, 64, 1, 4
    gen = torch.Generator().manual_seed(5)
    rows, *leaves = sparse_inputs(B, H, T, m, d, k, torch.float32, gen)
    leaves.append(torch.randn(B, H, m, d, generator=gen))
    rows = rows.to(DEVICE)
    leaves = [x.to(DEVICE).requires_grad_(True) for x in leaves]
    with AllocationRecorder() as rec:
        r, f = sparse_fm_triton(rows, *leaves[:3], m, None, leaves[3], output_final_state=True)
        (r.sum() + f.sum()).backward()
    largest = max(rec.nbytes, key=lambda e: e[1])
    assert len(rec.nbytes) > 20, "the recorder saw no allocations"
    legit = 4 * B * H * (T * k * d + m * d + T * d + T * k + m)
    assert largest[1] <= legit, f"{largest} exceeds the O(T k d + m d) bound ({legit} bytes)"
    assert 4 * B * H * T * m * d >= 18 * legit


class TensorRecorder(TorchDispatchMode):
    """Shape and storage address of every tensor an aten op returns (allocations and views alike)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.seen.append((str(func), tuple(o.shape), o.untyped_storage().data_ptr()))
        return out


def tokens_by_rows(recorder: TensorRecorder, T: int, m: int, exclude: set[int]) -> list[tuple[str, tuple[int, ...]]]:
    """Non-empty tensors whose size is a multiple of T * m (T and m primes that divide no other size here),
    except those in the storages `exclude`."""
    sized = [(op, shape, ptr) for op, shape, ptr in recorder.seen if math.prod(shape) > 0]
    return [(op, shape) for op, shape, ptr in sized if ptr not in exclude and math.prod(shape) % (T * m) == 0]


@pytest.mark.parametrize("opts", [dict(), dict(rate_per_row=False), dict(aux_loss_weight=0.1)])
def test_layer_sparse_forward_forms_no_tokens_by_rows_tensor_but_the_logits(opts):
    """The sparse layer on the Triton backend: in the forward, the router logits (B, T, H, m) are the only tensor
    with a T x m extent (no zero-filled weights, no full softmax, no rate projection onto all m rows), unless the
    balancing loss asks for the softmax; in the backward, only the logits' gradient has one. A control: the
    PyTorch backend forms the zero-filled (B, H, T, m) weights, and the recorder sees them."""
    B, T, m, k, H = 2, 37, 29, 3, 2  # sizes: T, m prime; k, H, d_mem, d_model, B * H * (m + 1), ... are not
    x = torch.randn(B, T, 16, device=DEVICE)
    doc = torch.tensor([[0] * 20 + [1] * 17, [0] * 37], device=DEVICE)
    found = {}
    for backend in ("triton", "torch"):
        cfg = FMConfig(n_heads=H, n_memories=m, d_mem=4, top_k=k, chunk_size=8, backend=backend, **opts)
        torch.manual_seed(0)
        layer = FactorizationMemory(16, cfg).to(DEVICE)
        logits: list[torch.Tensor] = []
        layer.w_alpha.register_forward_hook(lambda mod, inp, out, seen=logits: seen.append(out))
        xi = x.clone().requires_grad_(True)
        with TensorRecorder() as fwd:
            y = layer(xi, doc)
            loss = y.square().sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
        logit_storage = {logits[0].untyped_storage().data_ptr()}
        assert logits[0].shape == (B, T, H * m) and any(ptr in logit_storage for _, _, ptr in fwd.seen)
        with TensorRecorder() as bwd:
            loss.backward()
        assert xi.grad is not None and layer.w_alpha.weight.grad.abs().max() > 0
        found[backend] = (tokens_by_rows(fwd, T, m, logit_storage), tokens_by_rows(bwd, T, m, set()))

    fwd_extra, bwd_all = found["triton"]
    if "aux_loss_weight" in opts:  # the full softmax alpha (and the loss's one-hot hits) exist only for the loss
        assert fwd_extra and all(math.prod(shape) == B * T * H * m for _, shape in fwd_extra)
    else:
        assert fwd_extra == [], f"(T x m) tensors formed besides the router logits: {fwd_extra}"
    assert bwd_all and all(math.prod(shape) == B * T * H * m for _, shape in bwd_all), bwd_all
    control_fwd, _ = found["torch"]
    assert any(shape == (B, H, T, m) for _, shape in control_fwd), "the recorder missed the zero-filled weights"


def make_layer(backend: str, **opts) -> FactorizationMemory:
    cfg = FMConfig(n_heads=2, n_memories=8, d_mem=4, chunk_size=4, backend=backend, **opts)
    torch.manual_seed(0)
    return FactorizationMemory(16, cfg, layer_idx=0).to(DEVICE)


@pytest.mark.parametrize("opts", [dict(top_k=3), dict(top_k=1, rate_per_row=False, output_gate=True)])
def test_layer_sparse_path_matches_dense_path(opts):
    """The layer with top_k < m on the Triton backend (sparse kernels) == the PyTorch dense path, with grads."""
    sparse, dense = make_layer("triton", **opts), make_layer("torch", **opts)
    x = torch.randn(2, 11, 16, device=DEVICE)
    doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 11], device=DEVICE)
    outs = []
    for layer in (sparse, dense):
        xi = x.clone().requires_grad_(True)
        y = layer(xi, doc)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    assert sparse.backend == "triton" and dense.backend == "torch"
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_entry_point_backends_agree():
    gen = torch.Generator().manual_seed(9)
    rows, theta_k, phi_k, xbar = [x.to(DEVICE) for x in sparse_inputs(1, 2, 9, 4, 4, 2, torch.float32, gen)]
    r_t, f_t = fm_recurrence_sparse(rows, theta_k, phi_k, xbar, 4, output_final_state=True, backend="triton")
    r_c, f_c = fm_recurrence_sparse(rows, theta_k, phi_k, xbar, 4, output_final_state=True, backend="torch")
    torch.testing.assert_close(r_t, r_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_t, f_c, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(256, 64), (1024, 4)])
def test_gpu_bf16_matches_fp32_dense(m, k):
    """d_mem = 128, T = 2048 in bf16 against the fp32 dense chunked path on the same (bf16-rounded) inputs."""
    B, H, T, d = 2, 2, 2048, 128
    rows, theta_k, phi_k, xbar = synthetic_routing(B, H, T, m, k, d, torch.bfloat16, "cuda", seed=11)
    doc = random_docs(B, T, 4, torch.Generator().manual_seed(11)).cuda()
    leaves = [x.float().requires_grad_(True) for x in (theta_k, phi_k, xbar)]
    r_ref, f_ref = dense_chunk(rows, *leaves, m, doc, None, True, chunk_size=64)
    w = torch.randn_like(r_ref)
    (r_ref * w).sum().backward()
    ins = [x.detach().clone().requires_grad_(True) for x in (theta_k, phi_k, xbar)]
    r, f = sparse_fm_triton(rows, *ins, m, doc, None, output_final_state=True)
    (r.float() * w).sum().backward()
    torch.testing.assert_close(r.float(), r_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(f, f_ref, rtol=1e-3, atol=1e-3)
    for got, leaf in zip(ins, leaves):
        scale = leaf.grad.abs().max().item()
        torch.testing.assert_close(got.grad.float(), leaf.grad, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.gpu
def test_gpu_runs_where_dense_would_not_fit():
    """m = 4096: a dense (B, H, T, m, d_mem) bf16 tensor would be ~550 GB; the sparse op needs O(T k d_mem)."""
    B, H, T, m, k, d = 4, 16, 8192, 4096, 4, 128
    rows, theta_k, phi_k, xbar = synthetic_routing(B, H, T, m, k, d, torch.bfloat16, "cuda", seed=12)
    ins = [x.requires_grad_(True) for x in (theta_k, phi_k, xbar)]
    torch.cuda.reset_peak_memory_stats()
    r, _ = sparse_fm_triton(rows, *ins, m)
    r.float().sum().backward()
    assert torch.isfinite(r).all() and all(torch.isfinite(x.grad).all() for x in ins)
    assert torch.cuda.max_memory_allocated() < 64 * B * H * T * k * d  # a few copies of the pair-sized data
