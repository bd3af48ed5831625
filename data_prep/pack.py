"""Tokenize corpora into packed token shards for training (format: docs/data.md).

    python data_prep/pack.py --input a.jsonl b.jsonl.gz c.parquet --tokenizer tok.model --output out/packed \
        --num-proc 8 [--max-doc-tokens 65536 --too-long split] [--on-bad-line skip]

Inputs: JSONL (plain, .gz, .zst), parquet, plain text (one document per line), or a `datasets` dataset
(`hf:NAME` when online, or a local path). Re-running into the same output resumes: finished chunks are
reused and the result is identical to an uninterrupted run. The logic lives in fm_pretrain.data.pack.
"""

from __future__ import annotations

import argparse
import sys

from fm_pretrain.data import DataError
from fm_pretrain.data.pack import DEFAULT_SHARD_BYTES, pack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files (.jsonl[.gz|.zst], .parquet, .txt) or datasets")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--text-field", default="text", help="JSON key / column holding the document text")
    ap.add_argument("--valid-fraction", type=float, default=0.05, help="documents held out for validation")
    ap.add_argument("--num-proc", type=int, default=1, help="worker processes")
    ap.add_argument(
        "--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="input text per chunk (= per output shard)"
    )
    ap.add_argument("--seed", type=int, default=1234, help="seeds the validation hold-out")
    ap.add_argument("--on-bad-line", choices=["fail", "skip"], default="fail", help="a malformed or undecodable line")
    ap.add_argument("--max-doc-tokens", type=int, default=None, help="longest document (tokens without bos/eos)")
    ap.add_argument("--too-long", choices=["split", "truncate", "reject"], default="split", help="policy over the max")
    ap.add_argument("--hf-split", default="train", help="split to read from a datasets input")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        summary = pack(
            args.input,
            args.tokenizer,
            args.output,
            num_proc=args.num_proc,
            progress=not args.no_progress,
            text_field=args.text_field,
            valid_fraction=args.valid_fraction,
            shard_bytes=args.shard_bytes,
            seed=args.seed,
            on_bad_line=args.on_bad_line,
            max_doc_tokens=args.max_doc_tokens,
            too_long=args.too_long,
            hf_split=args.hf_split,
        )
    except (DataError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
