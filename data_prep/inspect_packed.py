"""Check what was packed: tokens per source, a document-length histogram (PNG), decoded random samples.

    python data_prep/inspect_packed.py out/packed [--tokenizer tok.model] [--plot lengths.png] [--samples 3]

The logic lives in fm_pretrain.data.report.
"""

import argparse
import sys

from fm_pretrain.data import DataError
from fm_pretrain.data.report import inspect_packed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("data_dir", help="a directory written by data_prep/pack.py")
    ap.add_argument("--tokenizer", default=None, help="to decode samples (default: the path in meta.json)")
    ap.add_argument("--plot", default=None, help="write the document-length histogram to this PNG")
    ap.add_argument("--samples", type=int, default=3, help="random training documents to decode")
    ap.add_argument("--chars", type=int, default=300, help="characters shown per sample")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        print(inspect_packed(args.data_dir, args.tokenizer, args.samples, args.chars, args.plot, args.seed))
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
