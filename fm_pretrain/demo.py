"""The README's main command: a small end-to-end pretraining run on the bundled EN+JA corpus.

    python -m fm_pretrain.demo [--steps 200] [--run-dir runs/demo]

Trains a sentencepiece tokenizer, packs the corpus, trains a tiny FM model with 2 DeepSpeed ranks
(CPU with gloo, or the local GPUs in bf16), prints the validation loss as it falls and how to open
the MLflow UI on the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from fm_pretrain.config import load_config
from fm_pretrain.launch import default_nproc, launch_local
from fm_pretrain.tracking import ensure_store, resolve_tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = [REPO_ROOT / "data" / "tiny" / "tiny_en.jsonl", REPO_ROOT / "data" / "tiny" / "tiny_ja.jsonl"]
CONFIG = REPO_ROOT / "configs" / "demo_tiny.yaml"


def read_metrics(run_dir: Path, key: str) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


def prepare_data(data_dir: Path) -> tuple[Path, Path]:
    """Train the demo tokenizer on the bundled EN+JA corpus and pack it: (data_dir/tokenizer.model, data_dir/packed).

    BPE with 2000 pieces trains in a second on the tiny corpus and covers its Japanese characters.
    """
    from data_prep import pack as pack_cli
    from data_prep import train_tokenizer as tok_cli

    corpus = [str(c) for c in CORPUS]
    tok_prefix, packed = data_dir / "tokenizer", data_dir / "packed"
    if tok_cli.main(
        ["--input", *corpus, "--output-prefix", str(tok_prefix), "--vocab-size", "2000", "--model-type", "bpe"]
    ):
        raise RuntimeError("tokenizer training failed (see the error above)")
    pack_args = ["--input", *corpus, "--tokenizer", f"{tok_prefix}.model", "--output", str(packed)]
    if pack_cli.main([*pack_args, "--valid-fraction", "0.1", "--no-progress"]):
        raise RuntimeError("packing failed (see the error above)")
    return Path(f"{tok_prefix}.model"), packed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: local GPUs, else 2 CPU ranks)")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for the training config")
    args = p.parse_args(argv)

    run_dir = Path(args.run_dir).resolve()
    t0 = time.time()
    print(f"[demo] 1/3 tokenizer and packing -> {run_dir / 'data'}", flush=True)
    tokenizer, packed = prepare_data(run_dir / "data")

    nproc = args.nproc or default_nproc()
    overrides = [
        f"data.path={packed}",
        f"data.tokenizer={tokenizer}",
        f"train.run_dir={run_dir}",
        f"train.steps={args.steps}",
        f"train.val_every={max(1, args.steps // 4)}",
        f"train.save_every={args.steps}",
        "train.resume=false",
        "downstream.enabled=true",  # after the last step: the 17 English/Japanese tasks, 20 items each
        "downstream.limit=20",
    ]
    if torch.cuda.is_available():
        overrides.append("train.precision=bf16")
    overrides += args.overrides
    cfg = load_config(CONFIG, overrides)  # validates the overrides before any rank starts
    # The MLflow store is created here, once, before the ranks start (two ranks creating sqlite at once fail).
    uri = resolve_tracking_uri(cfg.tracking, cfg.train.run_dir)
    ensure_store(uri, cfg.tracking.experiment)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a fresh run each time
    device = "GPU" if torch.cuda.is_available() else "CPU"
    print(f"[demo] 2/3 training {args.steps} steps on {nproc} {device} rank(s) (DeepSpeed)", flush=True)
    result = launch_local(CONFIG, overrides, nproc=nproc)
    if result.returncode != 0:
        print(f"[demo] training failed with exit code {result.returncode}", file=sys.stderr)
        return result.returncode

    val = read_metrics(run_dir, "val/loss")
    print("[demo] 3/3 validation loss by step:")
    for step, loss in val:
        print(f"         step {step:5d}   {loss:.4f}")
    fell = len(val) >= 2 and val[-1][1] < val[0][1]
    print(f"[demo] validation loss {'fell' if fell else 'did NOT fall'}: {val[0][1]:.4f} -> {val[-1][1]:.4f}")
    if cfg.downstream.enabled:
        results = run_dir / "downstream" / f"step_{args.steps}" / "eval_results.json"
        tasks = json.loads(results.read_text())["tasks"]
        print(f"[demo] downstream evaluation of {len(tasks)} EN/JA tasks (near chance at this size): {results}")
    print(f"[demo] done in {time.time() - t0:.0f} s. Open the MLflow UI on this run with:")
    print(f"         mlflow ui --backend-store-uri {uri} --port 5000   # then browse http://127.0.0.1:5000")
    return 0 if fell else 2


if __name__ == "__main__":
    sys.exit(main())
