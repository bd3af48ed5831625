"""Stages of the GPU check that run inside the full environment (torch, the carried wheels, this package).

    python scripts/gpu_check/stage_tasks.py env                  # versions and the device, one JSON line
    python scripts/gpu_check/stage_tasks.py data --out DIR       # tokenizer + packed data/tiny, one JSON line
    python scripts/gpu_check/stage_tasks.py configs --runs JSON  # load each training stage's config + overrides

check.py (standard library only) starts each one as a subprocess with its own time limit and reads the last
line of its output, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = [REPO / "data" / "tiny" / "tiny_en.jsonl", REPO / "data" / "tiny" / "tiny_ja.jsonl"]
# Vocabulary of the real configs (32K): 2000 BPE pieces learned from the tiny corpus plus reserved ids, so the
# embedding and LM head have their real size (a fifth of a 125M model's FLOPs) although the text uses 2K ids.
VOCAB_SIZE, LEARNED_PIECES = 32000, 2000


def env_info() -> dict:
    import numpy
    import torch

    info: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"not importable: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {
            "device": torch.cuda.get_device_name(0),
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "device_count": torch.cuda.device_count(),
        }
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip().splitlines()[-1] if smi.returncode == 0 else smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"not run: {e}"
    else:
        info["device"] = "cpu"
    return info


def prepare_data(out: Path, repeat: int) -> dict:
    """Tokenizer (BPE, VOCAB_SIZE ids) trained on data/tiny, and the tiny corpus packed `repeat` times.

    The corpus is written `repeat` times into one JSONL so that the validation split (10% of the documents,
    by a hash of the line) holds enough 2K-token sequences for a micro-batch.
    """
    from data_prep import pack as pack_cli
    from data_prep import train_tokenizer as tok_cli

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prefix = out / "tokenizer"
    tok_args = ["--input", *map(str, CORPUS), "--output-prefix", str(prefix), "--model-type", "bpe"]
    tok_args += ["--vocab-size", str(VOCAB_SIZE), "--reserved-tokens", str(VOCAB_SIZE - LEARNED_PIECES)]
    if tok_cli.main(tok_args):
        raise SystemExit("tokenizer training failed (above)")
    corpus = out / "corpus.jsonl"
    text = "".join(path.read_text(encoding="utf-8") for path in CORPUS)
    corpus.write_text(text * repeat, encoding="utf-8")
    packed = out / "packed"
    pack_args = ["--input", str(corpus), "--tokenizer", f"{prefix}.model", "--output", str(packed)]
    if pack_cli.main([*pack_args, "--valid-fraction", "0.1", "--no-progress"]):
        raise SystemExit("packing failed (above)")
    meta = json.loads((packed / "meta.json").read_text())
    splits = meta["splits"]
    return {
        "tokenizer": f"{prefix}.model",
        "packed": str(packed),
        "vocab_size": meta["vocab_size"],
        "train_tokens": splits["train"]["num_tokens"],
        "valid_tokens": splits["valid"]["num_tokens"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def check_configs(runs: list[dict]) -> dict:
    """Load each run's config with its overrides exactly as the trainer will (strict keys, cross-field checks)."""
    from fm_pretrain.config import ConfigError, load_config

    results = {}
    for run in runs:
        try:
            cfg = load_config(REPO / run["config"], run["overrides"])
            results[run["name"]] = f"ok: {cfg.model.model_type}, {cfg.model.n_layers} x {cfg.model.d_model}"
        except ConfigError as e:
            results[run["name"]] = f"error: {e}"
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("env")
    d = sub.add_parser("data")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--repeat", type=int, default=10)
    c = sub.add_parser("configs")
    c.add_argument("--runs", required=True, help="JSON list of {name, config, overrides}")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    if args.what == "env":
        print(json.dumps(env_info()), flush=True)
        return 0
    if args.what == "data":
        print(json.dumps(prepare_data(args.out, args.repeat)), flush=True)
        return 0
    results = check_configs(json.loads(args.runs))
    print(json.dumps(results), flush=True)
    return 0 if all(v.startswith("ok") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
