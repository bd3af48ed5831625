"""Sparse FM kernels on a GPU: training fwd+bwd (sparse vs dense), decode tokens/s (FM sparse, FM dense, Mamba-2)
and the per-row rates at the routed rows (gathered weight rows vs the full projection then a gather).

    python bench/fm_sparse.py train  [--dtype bf16] [--json out.json]
    python bench/fm_sparse.py decode [--json out.json]
    python bench/fm_sparse.py rates  [--dtype bf16] [--json out.json]

train: B*T = 32K tokens, 16 heads, d_mem = 128, T in {2K, 8K}, (m, k) in {(64, 16), (128, 32), (256, 64),
(1024, 4), (1024, 32)}. The sparse op (`sparse_fm_triton`) gets rows/weights (B, H, T, k); the dense path gets
the same weights zero-filled to (B, H, T, m) through `fm_recurrence` (--dense-backend triton: the chunked
Triton kernels; torch: the chunked PyTorch path, which runs out of memory at large m). Goals (issue #4):
sparse >= 2.5x dense at m = 256, k = 64 and >= 10x at m = 1024, k = 4.

Roofline model of the sparse op (H100: ~800 TFLOP/s bf16, ~3 TB/s HBM), with N = B*H*T*k pairs:
FLOPs ~ 21 N d_mem (forward: update 4, read 2; backward: recompute 4, adjoint 4, dphi 2, dtheta 3, dxbar 2;
the scan's log-depth overhead not counted); minimum bytes: each input read once and each output written
once (xbar, r, dr, dxbar at B*H*T*d_mem; rows, theta_k, phi_k and their grads at N).

rates: one rate projection of one layer (fm_1b sizes: d_model 2048, 16 heads) for 32K tokens, forward +
backward, as the sparse layer computes it (`linear_at_rows`: k rows of W per head, token blocks of gathered
weights) and as the dense formulation would (the (tokens, H m) projection, then a gather of the k rows); time
and peak memory of each, at (m, k) in TRAIN_SHAPES. FLOPs favour the gather by m / k; bytes favour the GEMM.

decode: one layer's step, batch 1 and 64: FM sparse (Triton step kernel, only k rows touched), FM dense
(`fm_step`, all m rows) and Mamba-2 (`ssd_step`, fm_1b/mamba2_1b sizes: 16 heads, d_state 128, head dim 256).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

PEAK_FLOPS, PEAK_BYTES = 800e12, 3e12
TOKENS, HEADS, D_MEM = 32768, 16, 128
TRAIN_SHAPES = [(64, 16), (128, 32), (256, 64), (1024, 4), (1024, 32)]


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=50))


def sparse_model(B: int, T: int, k: int, elt: int) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of the sparse op's forward + backward."""
    n = B * HEADS * T * k
    tok = B * HEADS * T * D_MEM
    return 21.0 * n * D_MEM, float(4 * tok * elt + n * (8 + 4 * 4))


def train_row(T: int, m: int, k: int, dtype: torch.dtype, dense_backend: str) -> dict:
    from fm_kernels.fm import fm_recurrence
    from fm_kernels.fm.sparse import dense_from_sparse, synthetic_routing
    from fm_kernels.fm.sparse_triton import sparse_fm_triton

    B = TOKENS // T
    rows, theta_k, phi_k, xbar = synthetic_routing(B, HEADS, T, m, k, D_MEM, dtype, "cuda", seed=T + m + k)
    theta_k, phi_k = theta_k.float(), phi_k.float()  # the router and rates are fp32 in the layer
    doc = (torch.arange(T, device="cuda") // 1024).expand(B, T).contiguous()  # 1K-token documents
    leaves = [x.clone().requires_grad_(True) for x in (theta_k, phi_k, xbar)]
    dr = torch.randn(B, HEADS, T, D_MEM, device="cuda", dtype=dtype)

    def sparse():
        r, _ = sparse_fm_triton(
            rows=rows, theta_k=leaves[0], phi_k=leaves[1], xbar=leaves[2], n_memories=m, doc_ids=doc
        )
        r.backward(dr)

    def dense():
        theta = dense_from_sparse(rows, leaves[0], m)
        phi = dense_from_sparse(rows, leaves[1], m)
        r, _ = fm_recurrence(theta=theta, phi=phi, xbar=leaves[2], doc_ids=doc, chunk_size=64, backend=dense_backend)
        r.backward(dr)

    out = {"T": T, "B": B, "m": m, "k": k, "dtype": str(dtype)}
    out["sparse_ms"] = bench_ms(sparse)
    flops, nbytes = sparse_model(B, T, k, xbar.element_size())
    t = out["sparse_ms"] * 1e-3
    out["sparse_tflops"] = flops / t / 1e12
    out["sparse_gbs"] = nbytes / t / 1e9
    out["sparse_roofline_frac"] = max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES) / t
    try:
        out["dense_ms"] = bench_ms(dense)
        out["speedup"] = out["dense_ms"] / out["sparse_ms"]
    except torch.cuda.OutOfMemoryError:
        out["dense_ms"] = "OOM"
    torch.cuda.empty_cache()
    return out


def rates_row(m: int, k: int, dtype: torch.dtype, d_model: int = 2048) -> dict:
    from fm_kernels.fm.routing import linear_at_rows, linear_at_rows_reference

    gen = torch.Generator(device="cuda").manual_seed(m + k)
    x = torch.randn(TOKENS, d_model, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(HEADS * m, d_model, device="cuda", generator=gen) * 0.02).to(dtype).requires_grad_(True)
    bias = torch.zeros(HEADS * m, device="cuda", dtype=dtype, requires_grad=True)
    rows = torch.rand(TOKENS, HEADS, m, device="cuda", generator=gen).topk(k, dim=-1).indices
    index = (rows + torch.arange(HEADS, device="cuda").view(1, HEADS, 1) * m).view(TOKENS, HEADS * k)
    grad = torch.randn(TOKENS, HEADS * k, device="cuda", generator=gen).to(dtype)
    out = {"tokens": TOKENS, "heads": HEADS, "d_model": d_model, "m": m, "k": k, "dtype": str(dtype)}
    for name, fn in (("gather", linear_at_rows), ("dense_then_gather", linear_at_rows_reference)):

        def step(fn=fn):
            fn(x, weight, index, bias).backward(grad)
            x.grad = weight.grad = bias.grad = None

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        out[f"{name}_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[f"{name}_ms"] = bench_ms(step)
    out["gather_speedup"] = out["dense_then_gather_ms"] / out["gather_ms"]
    return out


def decode_rows(batch: int, m: int, k: int, with_mamba: bool) -> list[dict]:
    from fm_kernels.fm import fm_step, fm_step_sparse
    from fm_kernels.fm.sparse import synthetic_routing
    from fm_kernels.ssd.chunk import ssd_step

    rows, theta_k, phi_k, xbar = synthetic_routing(batch, HEADS, 1, m, k, D_MEM, torch.bfloat16, "cuda", seed=batch)
    rows, theta_k, phi_k, xbar = rows[:, :, 0], theta_k[:, :, 0].float(), phi_k[:, :, 0].float(), xbar[:, :, 0]
    state = torch.randn(batch, HEADS, m, D_MEM, device="cuda")
    theta = torch.rand(batch, HEADS, m, device="cuda") / m
    h_ssm, n_state, p_head = 16, 128, 256
    s_ssm = torch.randn(batch, h_ssm, n_state, p_head, device="cuda")
    x_ssm = torch.randn(batch, h_ssm, p_head, device="cuda", dtype=torch.bfloat16)
    dt = torch.rand(batch, h_ssm, device="cuda")
    A = -torch.rand(h_ssm, device="cuda")
    Bm, Cm = torch.randn(2, batch, 1, n_state, device="cuda", dtype=torch.bfloat16)
    cases = {
        f"FM sparse (m={m}, k={k}, Triton)": lambda: fm_step_sparse(
            state=state, rows=rows, theta_k=theta_k, phi_k=phi_k, xbar=xbar, backend="triton"
        ),
        f"FM sparse (m={m}, k={k}, PyTorch)": lambda: fm_step_sparse(
            state=state, rows=rows, theta_k=theta_k, phi_k=phi_k, xbar=xbar, backend="torch"
        ),
        f"FM dense (m={m}, PyTorch)": lambda: fm_step(state=state, theta=theta, phi=theta, xbar=xbar),
    }
    if with_mamba:
        cases["Mamba-2 (PyTorch ssd_step)"] = lambda: ssd_step(s_ssm, x_ssm, dt, A, Bm, Cm)
    out = []
    for name, fn in cases.items():
        ms = bench_ms(fn)
        out.append({"batch": batch, "case": name, "step_ms": ms, "tokens_per_s": batch / (ms * 1e-3)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "decode", "rates"])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--dense-backend", choices=["triton", "torch"], default="triton")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/fm_sparse.py measures GPU kernels and needs a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results: list[dict] = []
    if args.what == "train":
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        for T in args.seq_lens:
            for m, k in TRAIN_SHAPES:
                results.append(train_row(T, m, k, dtype, args.dense_backend))
                print(json.dumps(results[-1]), flush=True)
    elif args.what == "rates":
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        for m, k in TRAIN_SHAPES:
            results.append(rates_row(m, k, dtype))
            print(json.dumps(results[-1]), flush=True)
    else:
        for batch in (1, 64):
            for m, k in ((128, 32), (1024, 4)):
                for row in decode_rows(batch, m, k, with_mamba=m == 128):
                    results.append(row)
                    print(json.dumps(row), flush=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
