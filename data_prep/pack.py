"""Tokenize JSONL corpora into packed token shards for training (format: docs/data.md).

    python data_prep/pack.py --input a.jsonl b.jsonl --tokenizer tok.model --output out/packed

The logic lives in fm_pretrain.data.pack.
"""

from __future__ import annotations

import argparse
import sys

from fm_pretrain.data import DataError
from fm_pretrain.data.pack import DEFAULT_SHARD_TOKENS, pack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="JSONL files")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--valid-fraction", type=float, default=0.05, help="documents held out for validation")
    ap.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (about)")
    ap.add_argument("--seed", type=int, default=1234, help="seeds the validation hold-out")
    ap.add_argument(
        "--on-bad-line", choices=["fail", "skip"], default="fail", help="a line that is not a JSON document"
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        summary = pack(
            args.input,
            args.tokenizer,
            args.output,
            text_field=args.text_field,
            valid_fraction=args.valid_fraction,
            num_proc=args.num_proc,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
            on_bad_line=args.on_bad_line,
            progress=not args.no_progress,
        )
    except (DataError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
