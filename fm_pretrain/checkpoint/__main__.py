"""Offline checkpoint tools: `python -m fm_pretrain.checkpoint {info,universal,export} STEP_DIR [--output PATH]`.

STEP_DIR is a step_N directory, or a checkpoints or run directory (its `latest` is followed).

- `info`: the checkpoint's step, data position, layout (data-parallel size, ZeRO stage, TP size), tokenizer hash.
- `universal`: write the layout-free form (`STEP_DIR/universal/`, or `--output`): full (TP = 1) fp32 weights and
  Adam moments keyed by parameter name; a tensor-parallel checkpoint's shards are merged. A run at any
  (tensor-parallel size, data-parallel size, ZeRO 1-3 stage) then resumes from STEP_DIR with
  `train.resume_from=STEP_DIR` (training also converts on demand; this does it ahead, e.g. on a login node).
- `export`: a plain `{name: fp32 tensor}` state dict (`torch.save`, default STEP_DIR/model_fp32.pt) for evaluation
  or inference outside DeepSpeed; it loads strictly into a tensor_parallel = 1 `DecoderLM`.

No ranks or GPUs are needed (CPU, one process).
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

from .export import load_weights
from .format import read_meta, resolve_step_dir
from .reshard import to_universal


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("command", choices=["info", "universal", "export"])
    p.add_argument("step_dir", type=Path, help="a checkpoint directory, e.g. runs/x/checkpoints/step_1000")
    p.add_argument("--output", type=Path, default=None, help="universal: directory; export: file (.pt)")
    args = p.parse_args(argv)
    try:
        step_dir = resolve_step_dir(args.step_dir)
        meta = read_meta(step_dir)
        if args.command == "info":
            keys = ("step", "consumed_samples", "layout", "tokenizer_sha256")
            print(json.dumps({"path": str(step_dir), **{k: meta.get(k) for k in keys}}))
        elif args.command == "universal":
            print(to_universal(step_dir, args.output))
        else:
            out = args.output or step_dir / "model_fp32.pt"
            torch.save(load_weights(step_dir, meta), out)
            print(out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
