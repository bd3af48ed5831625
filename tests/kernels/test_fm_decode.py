"""Sparse FM decoding: the Triton step kernel against the PyTorch gather/scatter step, and in the layer."""

import pytest
import torch

from fm_kernels.fm import fm_step_sparse
from fm_kernels.fm.sparse import synthetic_routing
from fm_pretrain.config import FMConfig
from fm_pretrain.model.layers.fm import FactorizationMemory

# Kernel tests run on the GPU when there is one (compiled), else in the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def untouched_mask(state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    idx = rows.unsqueeze(-1).expand(*rows.shape, state.shape[-1])
    return torch.ones_like(state, dtype=torch.bool).scatter(2, idx, False)


def check_steps(B, H, m, k, d, n_steps, dtype, device, tol, state_dtype=torch.float32, transposed=False):
    """n_steps decode steps with the kernel and with the PyTorch path from the same state."""
    rows, theta_k, phi_k, xbar = synthetic_routing(B, H, n_steps, m, k, d, dtype, device, seed=m + k)
    gen = torch.Generator(device=device).manual_seed(1)
    state = torch.randn(B, H, m, d, generator=gen, device=device).to(state_dtype)
    if transposed:  # a non-contiguous state must still be updated in place
        state = state.transpose(-1, -2).contiguous().transpose(-1, -2)
    ref = state.clone()
    for t in range(n_steps):
        args = (rows[:, :, t], theta_k[:, :, t], phi_k[:, :, t], xbar[:, :, t])
        before = state.clone()
        r, out = fm_step_sparse(state, *args, backend="triton")
        r_ref, ref = fm_step_sparse(ref, *args, backend="torch")
        assert out is state, "the step must update the state in place"
        keep = untouched_mask(state, args[0])
        assert torch.equal(state[keep], before[keep]), "the kernel wrote a row that was not selected"
        torch.testing.assert_close(r.float(), r_ref.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(state, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("m,k,d", [(8, 1, 4), (8, 3, 5), (4, 4, 4)])  # k = 1, odd widths, k = m
def test_decode_kernel_matches_torch_step(m, k, d):
    check_steps(2, 2, m, k, d, n_steps=3, dtype=torch.float32, device=DEVICE, tol=1e-6)


def test_decode_kernel_non_contiguous_state():
    check_steps(1, 2, 6, 2, 4, n_steps=2, dtype=torch.float32, device=DEVICE, tol=1e-6, transposed=True)


def test_backend_argument_is_checked():
    state = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        fm_step_sparse(state, torch.zeros(1, 1, 1, dtype=torch.long), state[..., 0, :1], state[..., 0, :1],
                       state[:, :, 0], backend="cuda")  # fmt: skip


@pytest.mark.parametrize("opts", [dict(top_k=2), dict(top_k=1, rate_per_row=False)])
def test_layer_generation_with_kernels_reproduces_parallel(opts):
    """Prefill (sparse training kernel, final state out) then Triton decode steps == the PyTorch parallel pass."""
    cfg = dict(n_heads=2, n_memories=8, d_mem=4, chunk_size=4, **opts)
    torch.manual_seed(0)
    fast = FactorizationMemory(16, FMConfig(backend="triton", **cfg)).to(DEVICE).eval()
    slow = FactorizationMemory(16, FMConfig(backend="torch", **cfg)).to(DEVICE).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 9, 16, device=DEVICE)
    full = slow(x)
    cache: dict = {}
    parts = [fast(x[:, :5], cache=cache)] + [fast(x[:, t : t + 1], cache=cache) for t in range(5, 9)]
    assert fast.backend == "triton" and cache["state"].shape == (2, 2, 8, 4)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_decode_bf16(B):
    """Real sizes: H = 16, m = 1024, d_mem = 128, bf16 inputs with the fp32 state."""
    for k in (4, 64):
        check_steps(B, 16, 1024, k, 128, n_steps=4, dtype=torch.bfloat16, device="cuda", tol=1e-2)
