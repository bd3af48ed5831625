"""Packing throughput on CPU: the sentencepiece limit, a plain datasets.map pipeline, and data_prep/pack.py.

    python bench/pack.py [--corpus ../shared/data/corpus] [--repeat 10] [--num-proc 2] [--vocab-size 32000]

Builds `repeat` copies of every JSONL file of the corpus (one input file), trains (or reuses) a unigram
tokenizer on the corpus, then runs each pipeline in its own subprocess, so that peak RSS (the process
tree's, sampled every 50 ms) is its own:
  * limit: sentencepiece's batch encode of all texts with num_threads=num_proc; texts already in memory,
    no I/O, timed from the first encode call;
  * datasets: load_dataset("json") + Dataset.map(batched, num_proc) + writing one numpy memmap;
  * pack: fm_pretrain.data.pack.pack(num_proc) (validation hold-out off, so every document is written).
Prints a Markdown table (wall s, tokens/s, peak RSS MiB) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def _limit(corpus: str, tok_path: str, num_proc: int) -> dict:
    from fm_pretrain.data.readers import iter_documents
    from fm_pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    texts = [t for _, t in iter_documents(corpus) if t.strip()]
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 4096):
        n += sum(len(x) + 2 for x in tok.sp.encode(texts[i : i + 4096], out_type=int, num_threads=num_proc))
    return {"tokens": n, "seconds": time.perf_counter() - t0}


def _datasets(corpus: str, tok_path: str, num_proc: int, out: str) -> dict:
    import datasets
    import numpy as np

    from fm_pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out)
    ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, num_proc=num_proc)

    def encode(batch: dict) -> dict:
        ids = tok.sp.encode(list(batch["text"]), out_type=int, add_bos=True, add_eos=True)
        return {"ids": ids, "n": [len(x) for x in ids]}

    ds = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
    total = int(sum(ds["n"]))
    mm = np.memmap(Path(out) / "tokens.bin", dtype=np.uint16, mode="w+", shape=(total,))
    pos = 0
    for batch in ds.iter(batch_size=1024):
        for ids in batch["ids"]:
            mm[pos : pos + len(ids)] = ids
            pos += len(ids)
    mm.flush()
    return {"tokens": total, "seconds": time.perf_counter() - t0}


def _pack(corpus: str, tok_path: str, num_proc: int, out: str) -> dict:
    from fm_pretrain.data.pack import pack

    t0 = time.perf_counter()
    s = pack([corpus], tok_path, Path(out) / "packed", num_proc=num_proc, progress=False, valid_fraction=0.0)
    return {"tokens": sum(s.tokens.values()), "seconds": time.perf_counter() - t0}


def _child(args: argparse.Namespace) -> None:
    fn = {"limit": _limit, "datasets": _datasets, "pack": _pack}[args.child]
    extra = [] if args.child == "limit" else [args.out]
    print(json.dumps(fn(args.corpus_file, args.tokenizer, args.num_proc, *extra)))


def _measure(name: str, corpus: str, tok: str, num_proc: int, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--corpus-file", corpus, "--tokenizer", tok]
    cmd += ["--num-proc", str(num_proc), "--out", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    return {"name": name, "process_wall": wall, "peak_rss_mib": peak / 2**20, **result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "corpus"))
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--workdir", default=None, help="keeps the corpus copy and tokenizer between runs")
    ap.add_argument("--only", nargs="+", default=["limit", "datasets", "pack"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pack-"))
    work.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(args.corpus).glob("*.jsonl"))
    corpus = work / f"corpus_x{args.repeat}.jsonl"
    if not corpus.is_file():
        with corpus.open("wb") as f:
            for _ in range(args.repeat):
                for p in files:
                    f.write(p.read_bytes())
    tok = work / f"unigram{args.vocab_size}.model"
    if not tok.is_file():
        from fm_pretrain.data.tokenizer import train_tokenizer

        t0 = time.perf_counter()
        train_tokenizer(files, tok.with_suffix(""), vocab_size=args.vocab_size, model_type="unigram")
        print(f"trained {tok} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(f"corpus {corpus} ({corpus.stat().st_size / 2**20:.0f} MiB), {args.num_proc} workers", file=sys.stderr)
    rows = []
    for name in args.only:
        with tempfile.TemporaryDirectory(dir=work) as out:
            r = _measure(name, str(corpus), str(tok), args.num_proc, out)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    limit = next((r for r in rows if r["name"] == "limit"), None)
    print("| pipeline | tokens | wall (s) | tokens/s | vs limit | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rate = r["tokens"] / r["seconds"]
        vs = f"{rate / (limit['tokens'] / limit['seconds']):.0%}" if limit else "-"
        cells = [r["name"], f"{r['tokens']:,}", f"{r['seconds']:.1f}", f"{rate / 1e6:.2f} M", vs]
        cells.append(f"{r['peak_rss_mib']:.0f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
