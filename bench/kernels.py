"""Kernel benchmark of issue #4 (dense part): chunked gated recurrence forward+backward on a CUDA GPU.

For each shape it times our Triton kernels, our PyTorch chunked path and, when importable,
flash-linear-attention's `chunk_gla` (per-key decay) / `chunk_simple_gla` (scalar decay) on the identical
problem (inputs prepared in each one's native layout outside the timed region), and reports FLOP and
minimum-byte counts and the fraction of the roofline (defaults: the H100 figures of issue #4).

    python bench/kernels.py                       # FM shapes: B*T = 32K tokens, 16 heads, d_mem 128
    python bench/kernels.py --decay scalar --keys 128 --values 64   # Mamba-2-like scalar decay
    python bench/kernels.py --out bench_dense.jsonl                 # also one JSON record per line

It refuses to run without CUDA: CPU timings (the interpreter) say nothing about the kernels. `--cpu-dry-run`
runs one toy shape on CPU in Triton's interpreter instead, to check that the script runs (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

CHUNK = 64


def flops_fwd_bwd(T: int, K: int, V: int, C: int = CHUNK) -> tuple[float, float]:
    """Useful FLOPs per (batch, head) sequence of T tokens (multiply-add = 2; causal halves counted once).

    Forward: state update 2KV + inter-chunk read 2KV + intra scores CK + intra mix CV per token.
    Backward: recomputed states 2KV and scores CK, dstate 2KV, dA CV, dv (A^T do CV + state 2KV),
    dq and dk from the states 4KV and within the chunk 2CK per token.
    """
    fwd = T * (4 * K * V + C * K + C * V)
    bwd = T * (10 * K * V + 3 * C * K + 2 * C * V)
    return float(fwd), float(bwd)


def min_bytes_fwd_bwd(T: int, K: int, V: int, elt: int, g_elt: int, scalar: bool) -> float:
    """Compulsory HBM traffic per sequence: every input read once and every output written once.

    Forward reads q, k, v, g and writes o; backward reads q, k, v, g, do and writes dq, dk, dv, dg.
    """
    g = T * g_elt * (1 if scalar else K)
    fwd = T * elt * (2 * K + 2 * V) + g
    bwd = T * elt * (4 * K + 3 * V) + 2 * g
    return float(fwd + bwd)


def time_ms(fn: Callable[[], None], grads: list[torch.Tensor]) -> float | str:
    if not torch.cuda.is_available():  # --cpu-dry-run: one call by the wall clock, a check that it runs
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grads)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"


def fwd_bwd(fn: Callable, args: list[torch.Tensor], do: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        o = fn(*args)
        (o[0] if isinstance(o, tuple) else o).backward(do)

    return run


def bench_shape(T: int, K: int, V: int, heads: int, tokens: int, scalar: bool, roof: tuple[float, float]) -> dict:
    from fm_kernels.gated import chunk_gated_recurrence
    from fm_kernels.gated.chunk_triton import triton_gated_recurrence

    B = tokens // T
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter's bf16 arithmetic is wrong
    gen = torch.Generator(device=dev).manual_seed(0)
    q = (torch.randn(B, heads, T, K, device=dev, generator=gen) * K**-0.5).to(dt)
    k = (torch.randn(B, heads, T, K, device=dev, generator=gen) * K**-0.5).to(dt)
    v = torch.randn(B, heads, T, V, device=dev, generator=gen).to(dt)
    g_shape = (B, heads, T) if scalar else (B, heads, T, K)
    g = torch.nn.functional.logsigmoid(torch.randn(g_shape, device=dev, generator=gen) + 4.0)  # fp32 log-decays
    do = torch.randn(B, heads, T, V, device=dev, generator=gen).to(dt)
    ours = [t.requires_grad_() for t in (q, k, v, g)]

    fwd, bwd = (f * B * heads for f in flops_fwd_bwd(T, K, V))
    nbytes = B * heads * min_bytes_fwd_bwd(T, K, V, 2, 4, scalar)
    peak_flops, peak_bw = roof
    t_roof = max((fwd + bwd) / peak_flops, nbytes / peak_bw) * 1e3  # ms
    row = {"T": T, "B": B, "heads": heads, "K": K, "V": V, "decay": "scalar" if scalar else "per-key"}
    row |= {"gflop": (fwd + bwd) / 1e9, "min_mbytes": nbytes / 1e6, "roofline_ms": t_roof}

    row["triton_ms"] = time_ms(fwd_bwd(lambda *a: triton_gated_recurrence(*a, chunk_size=CHUNK), ours, do), ours)
    row["torch_ms"] = time_ms(fwd_bwd(lambda *a: chunk_gated_recurrence(*a, chunk_size=CHUNK), ours, do), ours)
    row["fla_ms"] = "not installed"
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        pass
    else:  # fla's native layout is (B, T, H, K); scale=1 matches our o_t = S_t^T q_t
        native = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, g)]
        fla_fn = chunk_simple_gla if scalar else chunk_gla
        fla_call = lambda q_, k_, v_, g_: fla_fn(q=q_, k=k_, v=v_, g=g_, scale=1.0)  # noqa: E731
        run = fwd_bwd(fla_call, native, do.transpose(1, 2).contiguous())
        row["fla_ms"] = time_ms(run, native)
    for name in ("triton", "torch", "fla"):
        ms = row[f"{name}_ms"]
        if isinstance(ms, float):
            row[f"{name}_roofline_frac"] = t_roof / ms
            row[f"{name}_tflops"] = (fwd + bwd) / ms / 1e9
    if isinstance(row["fla_ms"], float) and isinstance(row["triton_ms"], float):
        row["speedup_vs_fla"] = row["fla_ms"] / row["triton_ms"]
    return row


def fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768, help="B * T per shape")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--keys", type=int, nargs="+", default=[64, 128, 256, 1024], help="K (FM: m memory rows)")
    p.add_argument("--values", type=int, default=128, help="V (FM: d_mem)")
    p.add_argument("--decay", choices=["per-key", "scalar"], default="per-key")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 matmul peak (issue #4: H100 ~800)")
    p.add_argument("--peak-tbps", type=float, default=3.0, help="HBM bandwidth (issue #4: H100 ~3 TB/s)")
    p.add_argument("--out", help="append one JSON record per shape to this file")
    p.add_argument("--cpu-dry-run", action="store_true", help="one tiny shape on CPU (Triton's interpreter): runs?")
    args = p.parse_args(argv)
    if args.cpu_dry_run:  # scripts/gpu_check.sh --cpu-dry-run: every code path at toy sizes; times mean nothing
        args.tokens, args.heads, args.seq_lens, args.keys, args.values = 32, 1, [32], [16], 16
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("bench/kernels.py needs CUDA: no GPU is visible, and CPU (interpreter) timings are meaningless.")
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    import triton

    print(f"# {device}, torch {torch.__version__}, triton {triton.__version__}, decay {args.decay}")
    cols = ["T", "B", "K", "V", "gflop", "min_mbytes", "roofline_ms", "triton_ms", "torch_ms", "fla_ms"]
    cols += ["triton_roofline_frac", "speedup_vs_fla"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    roof = (args.peak_tflops * 1e12, args.peak_tbps * 1e12)
    for T in args.seq_lens:
        for K in args.keys:
            row = bench_shape(T, K, args.values, args.heads, args.tokens, args.decay == "scalar", roof)
            row["device"] = device
            print("| " + " | ".join(fmt(row.get(c, "-")) for c in cols) + " |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
