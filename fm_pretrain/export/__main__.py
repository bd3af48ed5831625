"""Export a checkpoint for Hugging Face transformers, or check an export (docs/export.md).

    python -m fm_pretrain.export --checkpoint RUN_DIR_or_STEP_DIR --out DIR [--dtype bfloat16] [--max-shard-size 2GB]
    python -m fm_pretrain.export --check DIR [--checkpoint RUN_DIR_or_STEP_DIR] [--atol 1e-5]

The export is checked after writing (as `--check` does) unless `--no-check`. Exit codes: 0 done, 1 the check failed
(the message names the largest difference), 2 bad input (a missing or partial checkpoint, an unsupported mixer, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (universal conversion)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", type=Path, help="a step_N directory, or a run / checkpoints directory (latest)")
    p.add_argument("--out", type=Path, help="the export directory to write")
    p.add_argument("--check", type=Path, metavar="DIR", help="check an existing export against its checkpoint")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the run's data.tokenizer (sha256 checked)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--no-check", action="store_true", help="do not reload and compare after exporting")
    p.add_argument("--skip-tokenizer-check", action="store_true", help="export even if tokenizer.json disagrees")
    p.add_argument("--atol", type=float, default=None, help="logit tolerance (default 1e-5 fp32, 2e-2 bf16)")
    p.add_argument("--device", default="cpu", help="device for --check (default cpu)")
    args = p.parse_args(argv)
    if (args.check is None) == (args.out is None):
        p.error("give either --checkpoint CKPT --out DIR (export) or --check DIR")
    if args.out is not None and args.checkpoint is None:
        p.error("--out needs --checkpoint")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from fm_pretrain.config import ConfigError

    from . import CheckFailed, ExportError, check_export, export_checkpoint

    try:
        if args.check is not None:
            report = check_export(args.check, args.checkpoint, atol=args.atol, device=args.device)
            print(json.dumps(report, indent=1))
            print(f"check passed: {args.check} reproduces {report['checkpoint']}")
        else:
            out = export_checkpoint(
                args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite, check=False,
                check_tokenizer=not args.skip_tokenizer_check,
            )  # fmt: skip
            print(f"exported: {out}")
            if not args.no_check:
                report = check_export(out, args.checkpoint, atol=args.atol, device=args.device)
                print(f"check passed: logits max |diff| {report['logits']['max_abs_diff']:.3g}, greedy tokens equal, "
                      "tokenizer equal on the eval fixtures")  # fmt: skip
    except CheckFailed as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError, ConfigError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
