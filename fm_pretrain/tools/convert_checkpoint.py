"""Offline checkpoint conversion: `python -m fm_pretrain.tools.convert_checkpoint {info,universal,export} STEP_DIR`.

- `info`: the checkpoint's step, data position and layout (data-parallel size, ZeRO stage, TP size).
- `universal`: write the layout-free form (`STEP_DIR/universal/`, or `--output`): full (TP = 1) fp32 weights and
  Adam moments keyed by parameter name; a tensor-parallel checkpoint's shards are merged. A run at any
  (tensor-parallel size, data-parallel size, ZeRO stage) then resumes from STEP_DIR with `train.resume_from=STEP_DIR`
  (training also converts on demand; this does it ahead, e.g. on a login node).
- `export`: a plain `{name: fp32 tensor}` state dict (`torch.save`) for evaluation or inference outside DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

from fm_pretrain.training.checkpoint import read_meta  # noqa: E402
from fm_pretrain.training.reshard import UNIVERSAL_DIR, to_universal  # noqa: E402


def full_weights(universal: Path) -> dict[str, torch.Tensor]:
    """{parameter name: full fp32 tensor} from a universal checkpoint directory."""
    zero = universal / "zero"
    weights = {}
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        blob = torch.load(param_dir / "fp32.pt", weights_only=False)
        weights[param_dir.name] = blob["param"] if isinstance(blob, dict) else blob
    if not weights:
        raise FileNotFoundError(f"{zero}: no parameter directories; is this a universal checkpoint?")
    return weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["info", "universal", "export"])
    p.add_argument("step_dir", type=Path, help="a checkpoint directory, e.g. runs/x/checkpoints/step_1000")
    p.add_argument("--output", type=Path, default=None, help="universal: directory; export: file (.pt)")
    args = p.parse_args(argv)
    try:
        meta = read_meta(args.step_dir)
        if args.command == "info":
            print(json.dumps({k: meta[k] for k in ("step", "consumed_samples", "layout", "tokenizer_sha256")}))
        elif args.command == "universal":
            print(to_universal(args.step_dir, args.output))
        else:
            universal = args.step_dir / UNIVERSAL_DIR
            if not (universal / "zero").is_dir():
                to_universal(args.step_dir)
            out = args.output or args.step_dir / "model_fp32.pt"
            torch.save(full_weights(universal), out)
            print(out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
