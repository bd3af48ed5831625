"""Decoding after long prompts: time per step and memory vs prompt length, FM dense, FM sparse, Mamba-2 and the
Transformer at matched parameter count, batch 1 and 16, in one run; prints the table and the ratios.

    python bench/decode.py                       # CPU: small models (preset cpu), prompts 1K-32K; a few minutes
    python bench/decode.py --preset gpu          # on a GPU: the 125M configs, bf16, prompts 1K-16K (gpu_check)
    python bench/decode.py --preset gpu-1b       # on a GPU: the 1B configs, bf16, prompts 1K-128K
    python bench/decode.py --cpu-dry-run         # seconds: tiny sizes, to check that it runs
    ... [--json out.jsonl]

Method. Prefill (--prefill): `real` feeds one random prompt in chunks (`fm_pretrain.inference.prefill`, carrying
the states / KV cache) up to each prompt length L in turn (the default on CUDA); `synthetic` (the default on CPU,
where a real 32K prefill of every model takes many minutes) prefills 64 tokens for real, then shapes the caches as
an L-token prompt leaves them: the recurrent states have no time axis and stay, attention's keys and values are
tiled to L entries. A decoding step's cost depends on these shapes only. At each L the caches are copied and
replicated to the batch size (`repeat_caches`: B rows that all prefilled L tokens, which cost the same to decode as
B different prompts), then --warmup greedy decoding steps run and --steps more are timed; one step is one token for
every row and the median step is reported. On CPU with one thread (--threads 1, the default) a step's time is the
process's CPU time, user + system, which other processes' load on a shared machine does not inflate; on CUDA it is
synchronised wall-clock time. With synthetic caches a second pass, longest prompt first, times every point again
and the lower median is kept, so a drift in the machine's state does not pass for a trend.

Memory, what decoding holds beyond the weights (its caches and activations): on CUDA the peak allocated during the
decoding minus what was allocated before it (torch.cuda.max_memory_allocated, reset before every point; one
process per model); on CPU the peak RSS of a process per model and batch size so far (ru_maxrss, monotone: the
lengths ascend) minus its RSS before the first prefill. The exact bytes of the caches are printed beside. Points
whose caches would exceed --max-cache-gb are skipped and listed.

Matched parameters: the mixers differ in size, so each model's SwiGLU width is set to bring its non-embedding
parameter count to the Transformer's (within one step of 64 channels); the counts are printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = ("fm_dense", "fm_sparse", "mamba2", "transformer")

PRESETS = {
    # CPU: a 4-layer d=256 model of each kind (about 5.3M non-embedding parameters, matched).
    "cpu": dict(
        d_model=256, n_layers=4, vocab=8000, fm=dict(n_heads=4, n_memories=64, d_mem=64, top_k=16),  # ~5.3M
        attention=dict(n_heads=4), mamba2=dict(d_state=64, head_dim=64, expand=2),
        lengths=[1024, 2048, 4096, 8192, 16384, 32768], batches=[1, 16], dtype="fp32", chunk=1024, max_cache_gb=2.5,
    ),
    # GPU, what scripts/gpu_check.sh runs in its 45 s: the 125M configs' sizes.
    "gpu": dict(
        d_model=768, n_layers=12, vocab=32000, fm=dict(n_heads=12, n_memories=64, d_mem=64, top_k=16),
        attention=dict(n_heads=12), mamba2=dict(d_state=128, head_dim=64, expand=2),
        lengths=[1024, 4096, 16384], batches=[1, 16], dtype="bf16", chunk=4096, max_cache_gb=40.0,
    ),
    # GPU: the 1B configs' sizes (configs/{fm,transformer,mamba2}_1b.yaml), to 128K.
    "gpu-1b": dict(
        d_model=2048, n_layers=16, vocab=32000, fm=dict(n_heads=16, n_memories=128, d_mem=128, top_k=32),
        attention=dict(n_heads=16), mamba2=dict(d_state=128, head_dim=64, expand=2),
        lengths=[1024, 4096, 16384, 32768, 65536, 131072], batches=[1, 16], dtype="bf16", chunk=8192,
        max_cache_gb=100.0,
    ),
    "dry": dict(
        d_model=64, n_layers=2, vocab=512, fm=dict(n_heads=2, n_memories=16, d_mem=16, top_k=4),
        attention=dict(n_heads=2), mamba2=dict(d_state=16, head_dim=32, expand=2),
        lengths=[64, 128], batches=[1, 2], dtype="fp32", chunk=64, max_cache_gb=1.0,
    ),
}  # fmt: skip


def model_config(name: str, p: dict, mlp_hidden: int | None = None):
    from fm_pretrain.config import from_dict

    fm = {**p["fm"], "top_k": p["fm"]["top_k"] if name == "fm_sparse" else None}
    kind = {"fm_dense": "fm", "fm_sparse": "fm", "mamba2": "mamba2", "transformer": "attention"}[name]
    model = {
        "vocab_size": p["vocab"], "d_model": p["d_model"], "n_layers": p["n_layers"], "layer_pattern": [kind],
        "max_seq_len": max(p["lengths"]) + 64, "fm": fm, "attention": p["attention"], "mamba2": p["mamba2"],
        "mlp_hidden": mlp_hidden,
    }  # fmt: skip
    return from_dict({"model": model}).model


def non_embedding_params(cfg) -> int:
    from fm_pretrain.model import DecoderLM

    with torch.device("meta"):
        return DecoderLM(cfg).num_params(exclude_embeddings=True)


def matched_mlp(name: str, p: dict) -> int:
    """The SwiGLU width that brings `name`'s non-embedding parameters to the Transformer's."""
    target = non_embedding_params(model_config("transformer", p))
    base = model_config(name, p)
    mixer_and_rest = non_embedding_params(base) - 3 * p["d_model"] * base.mlp_width * p["n_layers"]
    width = (target - mixer_and_rest) / (3 * p["d_model"] * p["n_layers"])
    return max(64, int(round(width / 64)) * 64)


def cache_bytes(caches: list[dict]) -> int:
    return sum(v.numel() * v.element_size() for c in caches for v in c.values() if torch.is_tensor(v))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_caches(caches: list[dict], done: int, L: int) -> list[dict]:
    """Caches shaped as after an L-token prompt from the caches of a real `done`-token prefill: the recurrent
    states (FM "state", Mamba-2 "conv"/"ssm") have no time axis and are kept; attention's "k"/"v" (B, H_kv, S, D)
    are tiled along S to L entries; "pos" = L (fm_pretrain/model/cache.py lists the keys)."""
    out = []
    for cache in caches:
        c = dict(cache, pos=L)
        for key in ("k", "v"):
            if key in c:
                reps = -(-L // done)
                c[key] = c[key].repeat(1, 1, reps, 1)[:, :, :L].contiguous()
        out.append(c)
    return out


SYNTHETIC_PREFILL = 64  # tokens prefilled for real before the caches are shaped (small: its peak stays small)


def worker(name: str, batches: list[int], p: dict, args: argparse.Namespace) -> None:
    """One model at the given batch sizes, prompts in ascending length; one JSON line per point on stdout."""
    from fm_pretrain.inference import new_caches, prefill
    from fm_pretrain.model import DecoderLM

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[p["dtype"]]
    torch.manual_seed(0)
    cfg = model_config(name, p, matched_mlp(name, p))
    model = DecoderLM(cfg).to(device=device, dtype=dtype).eval()
    params = model.num_params(exclude_embeddings=True)
    real = args.prefill == "real"
    ids = torch.randint(4, p["vocab"], (1, max(p["lengths"]) if real else SYNTHETIC_PREFILL), device=device)
    caches, done = new_caches(model), 0
    base_rss = rss_mb()
    if not real:
        with torch.no_grad():
            logits = prefill(model, ids, caches)
        done = ids.shape[1]
    rows = {}
    for L in p["lengths"]:
        if real:
            with torch.no_grad():
                logits = prefill(model, ids[:, done:L], caches, chunk_size=p["chunk"])
            done = L
        for batch in batches:
            size = cache_bytes(caches if real else synthetic_caches(caches, done, L)) * batch
            row = {"model": name, "params": params, "batch": batch, "prompt": L, "cache_mb": size / 2**20,
                   "prefill": args.prefill}  # fmt: skip
            if size > p["max_cache_gb"] * 2**30:
                rows[L, batch] = {**row, "skipped": f"cache {size / 2**30:.1f} GB > {p['max_cache_gb']} GB"}
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            ms = decode_ms(model, caches, done, L, batch, logits, real, args)
            if device.type == "cuda":
                mem = (torch.cuda.max_memory_allocated() - before) / 2**20
            else:
                mem = rss_mb() - base_rss
            rows[L, batch] = {**row, "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms, "peak_mb": mem}
    if not real:  # a second pass, longest first: the minimum of both cancels drift in a shared machine's load
        for L, batch in reversed(list(rows)):
            if "skipped" not in rows[L, batch]:
                ms = min(rows[L, batch]["ms_per_step"], decode_ms(model, caches, done, L, batch, logits, real, args))
                rows[L, batch].update(ms_per_step=ms, tokens_per_s=batch * 1e3 / ms)
    for row in rows.values():
        print(json.dumps(row), flush=True)


def decode_ms(model, caches, done: int, L: int, batch: int, logits, real: bool, args) -> float:
    """Median milliseconds of one greedy decoding step for `batch` rows after an L-token prompt (on copies)."""
    from fm_pretrain.inference import repeat_caches

    run = copy.deepcopy(caches) if real else synthetic_caches(caches, done, L)
    if batch > 1:
        run = repeat_caches(run, batch)
    nxt = logits.argmax(-1).repeat(batch)
    # CPU, one thread: the process's CPU time (user + system), which other processes' load does not inflate;
    # CUDA or several threads: wall-clock time (synchronised).
    clock = time.process_time if not nxt.is_cuda and args.threads == 1 else time.perf_counter
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            t0 = clock()
            nxt = model(nxt[:, None], caches=run).logits[:, -1].argmax(-1)
            if nxt.is_cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(clock() - t0)
    return 1e3 * statistics.median(times)


def table(rows: list[dict], p: dict) -> str:
    lines = []
    for batch in p["batches"]:
        lines.append(f"\nbatch {batch}: ms per step (one token per row) / peak memory MB / cache MB")
        lines.append("prompt  " + "".join(f"{m:>30}" for m in MODELS))
        for L in p["lengths"]:
            cells = []
            for m in MODELS:
                r = next((r for r in rows if r["model"] == m and r["batch"] == batch and r["prompt"] == L), None)
                if r is None or "skipped" in r:
                    cells.append(f"{'skipped' if r else 'n/a':>30}")
                else:
                    cells.append(f"{r['ms_per_step']:>12.2f} {r['peak_mb']:>8.0f} {r['cache_mb']:>8.1f}")
            lines.append(f"{L:>6}  " + "".join(cells))
    return "\n".join(lines)


def ratios(rows: list[dict], p: dict) -> str:
    def ms(m: str, b: int, L: int) -> float | None:
        r = next((r for r in rows if r["model"] == m and r["batch"] == b and r["prompt"] == L), None)
        return None if r is None or "skipped" in r else r["ms_per_step"]

    lo, hi = min(p["lengths"]), max(p["lengths"])
    out = ["\nratios (time per step; > 1 means the second is faster)"]
    for b in p["batches"]:
        for m in MODELS:
            a, z = ms(m, b, lo), ms(m, b, hi)
            if a and z:
                out.append(f"batch {b:>2}  {m:<12} at {hi} / at {lo}: {z / a:.2f}")
        for L in p["lengths"]:
            parts = []
            for num, den in (("transformer", "fm_sparse"), ("mamba2", "fm_sparse"), ("fm_dense", "fm_sparse")):
                a, z = ms(num, b, L), ms(den, b, L)
                parts.append(f"{num}/{den} {a / z:.2f}" if a and z else f"{num}/{den} n/a")
            out.append(f"batch {b:>2}  prompt {L:>6}: " + "   ".join(parts))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, cpu otherwise")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU (checks that it runs)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--lengths", default=None, help="comma list overriding the preset's prompt lengths")
    ap.add_argument("--steps", type=int, default=16, help="timed decoding steps per point (the median is reported)")
    ap.add_argument("--max-cache-gb", type=float, default=None, help="skip points with larger caches (preset's)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier figures on a shared machine)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write every row as JSON lines")
    ap.add_argument("--prefill", choices=["real", "synthetic"], default=None,
                    help="real: chunked prefill of the whole prompt; synthetic: caches shaped as after it (module "
                    "docstring); default: real on CUDA, synthetic on CPU")  # fmt: skip
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = "dry" if args.cpu_dry_run else args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    if args.cpu_dry_run:
        args.device = "cpu"
    p = dict(PRESETS[preset])
    if args.lengths:
        p["lengths"] = [int(x) for x in args.lengths.split(",")]
    if args.max_cache_gb is not None:
        p["max_cache_gb"] = args.max_cache_gb
    args.prefill = args.prefill or ("real" if args.device.startswith("cuda") else "synthetic")
    if args.worker:
        worker(args.worker, [int(b) for b in args.batches.split(",")], p, args)
        return 0

    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"bench/decode.py preset {preset} on {args.device}, prefill {args.prefill}, {args.threads} CPU thread(s) "
          f"(torch {torch.__version__}, {os.cpu_count()} CPUs), {started}")  # fmt: skip
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        # CPU: one process per batch size, so each series' peak RSS is its own; CUDA: one per model (peak memory
        # is reset before every point there).
        series = [[b] for b in p["batches"]] if args.device == "cpu" else [p["batches"]]
        for batches in series:
            cmd = [sys.executable, __file__, "--worker", name, "--batches", ",".join(map(str, batches)),
                   "--preset", preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--device", args.device, "--prefill", args.prefill, "--threads", str(args.threads)]  # fmt: skip
            if args.lengths:
                cmd += ["--lengths", args.lengths]
            if args.max_cache_gb is not None:
                cmd += ["--max-cache-gb", str(args.max_cache_gb)]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return out.returncode
            rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        params = next(r["params"] for r in rows if r["model"] == name)
        print(f"  {name}: {params / 1e6:.2f}M non-embedding parameters, {time.perf_counter() - t0:.0f} s")
    print(table(rows, p))
    print(ratios(rows, p))
    skipped = [r for r in rows if "skipped" in r]
    for r in skipped:
        print(f"skipped: {r['model']} batch {r['batch']} prompt {r['prompt']}: {r['skipped']}")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
