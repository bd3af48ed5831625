"""The memory family's costs, one layer forward + backward (issue 13's Performance section); CPU or CUDA.

    python bench/memory_family.py mom     [--json out.json]   # MoM time vs M at k = 2, vs k at M = 16
    python bench/memory_family.py caching [--json out.json]   # FM vs FM + Memory Caching (SSC, GRM) vs context
    python bench/memory_family.py caching --bases fm mamba2 mom   # the same around Mamba-2 and MoM too

mom: a MixtureOfMemories layer (GLA inner rule, no shared memory so that only the routed memories count; d_model
256, 4 heads, K = V = 32, chunk 32), B = 1, T = 2048 tokens (--tokens). Rows: M in {4, 8, 16, 32} at k = 2, and
k in {1, 2, 4, 8} at M = 16; for each M also "dense": the same layer with k = M, i.e. the work of a dense run
over all M memories (what the O(k) grouping avoids). Goal: the time grows with k, not with M.

caching: a sparse FM layer (d_model 256, 4 heads, m = 32, k = 8, d_mem 64, chunk 64, the chunked PyTorch path:
`model.fm.backend=torch`, the path Memory Caching also runs on) alone and wrapped in Memory Caching (segments of
256 tokens, checkpoint states) with SSC (top-2 segments) and GRM, B = 1, T in {1024, 2048, 4096} (--contexts).
Goals: FM + SSC within 1.5x of FM at 4K; GRM's cost against SSC's as the context grows. `--bases mamba2 mom`: the
same around a Mamba-2 layer (d_state 64, head_dim 64, expand 2, chunk 64) and a MoM layer (M = 8, k = 2, shared
memory, 4 heads, K = V = 32, chunk 32).

Each time is the minimum of --repeat runs after one warm-up run (fp32; torch's default threads on CPU). --clock
wall (default) measures wall time; --clock cpu the process's CPU time (all its threads), which other processes
competing for the cores disturb far less: use it for ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fm_pretrain.config import FMConfig, Mamba2Config, MemoryCachingConfig, MoMConfig  # noqa: E402
from fm_pretrain.model.layers.fm import FactorizationMemory  # noqa: E402
from fm_pretrain.model.layers.mamba2 import Mamba2  # noqa: E402
from fm_pretrain.model.layers.mom import MixtureOfMemories  # noqa: E402
from fm_pretrain.model.memory_caching import MemoryCaching  # noqa: E402

D_MODEL = 256


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def fwd_bwd_seconds(layer: torch.nn.Module, x: torch.Tensor, repeat: int) -> float:
    """Minimum time (`clock`) of one forward + backward (the mean square of the output as the loss)."""

    def once() -> float:
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = clock()
        y = layer(xi)
        loss = y.float().pow(2).mean() + (layer.aux_loss if getattr(layer, "aux_loss", None) is not None else 0)
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        return clock() - t0

    once()
    return min(once() for _ in range(repeat))


def mom_rows(tokens: int, repeat: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, D_MODEL, device=device)
    rows = []
    shapes = [(M, 2, "sparse") for M in (4, 8, 16, 32)] + [(16, k, "sparse") for k in (1, 4, 8)]
    shapes += [(M, M, "dense") for M in (4, 8, 16, 32)]
    for M, k, kind in shapes:
        cfg = MoMConfig(n_memories=M, top_k=k, shared_memory=False, n_heads=4, d_key=32, d_value=32, chunk_size=32)
        layer = MixtureOfMemories(D_MODEL, cfg).to(device)
        s = fwd_bwd_seconds(layer, x, repeat)
        rows.append({"bench": "mom", "M": M, "k": k, "kind": kind, "tokens": tokens, "seconds": s})
        print(f"mom  M={M:3d} k={k:2d} {kind:6s} T={tokens}: {s * 1e3:8.1f} ms", flush=True)
    base = next(r["seconds"] for r in rows if r["M"] == 4 and r["k"] == 2)
    for r in rows:
        r["vs_M4_k2"] = r["seconds"] / base
    return rows


def caching_base(base: str) -> torch.nn.Module:
    """The layer Memory Caching wraps in the `caching` bench (module docstring)."""
    if base == "fm":
        cfg = FMConfig(n_heads=4, n_memories=32, d_mem=64, top_k=8, chunk_size=64, backend="torch")
        return FactorizationMemory(D_MODEL, cfg)
    if base == "mamba2":
        return Mamba2(D_MODEL, Mamba2Config(d_state=64, head_dim=64, n_groups=1, chunk_size=64), 0, 1e-5)
    return MixtureOfMemories(D_MODEL, MoMConfig(n_memories=8, top_k=2, n_heads=4, d_key=32, d_value=32, chunk_size=32))


def caching_rows(contexts: list[int], repeat: int, device: str, bases: list[str]) -> list[dict]:
    rows = []
    for base in bases:
        for T in contexts:
            torch.manual_seed(0)
            x = torch.randn(1, T, D_MODEL, device=device)
            times = {}
            for agg in ("", "ssc", "grm"):
                torch.manual_seed(1)
                layer = caching_base(base)
                if agg:
                    mc = MemoryCachingConfig(mixers=[base], aggregation=agg, segment_size=256, top_k_segments=2)
                    layer = MemoryCaching(layer, mc, D_MODEL)
                name = f"{base}+{agg}" if agg else base
                times[name] = fwd_bwd_seconds(layer.to(device), x, repeat)
                print(f"caching {name:11s} T={T:5d}: {times[name] * 1e3:8.1f} ms", flush=True)
            for name, s in times.items():
                rows.append({"bench": "caching", "base": base, "layer": name, "tokens": T, "seconds": s,
                             "vs_base": s / times[base]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["mom", "caching", "all"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--bases", nargs="+", choices=["fm", "mamba2", "mom"], default=["fm"], help="caching: the layers")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    env = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "clock": args.clock}  # fmt: skip
    print(env, flush=True)
    rows = []
    if args.what in ("mom", "all"):
        rows += mom_rows(args.tokens, args.repeat, args.device)
    if args.what in ("caching", "all"):
        rows += caching_rows(args.contexts, args.repeat, args.device, args.bases)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
