"""Train a sentencepiece tokenizer on JSONL corpora.

    python data_prep/train_tokenizer.py --input a.jsonl b.jsonl --output-prefix out/tok --vocab-size 8000

Writes out/tok.model and out/tok.vocab, then prints the vocabulary size and the characters per token
measured on each input file. The logic lives in fm_pretrain.data.tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time

from fm_pretrain.data import DataError
from fm_pretrain.data.tokenizer import chars_per_token, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="JSONL files")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        tok = train_tokenizer(
            args.input,
            args.output_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            text_field=args.text_field,
            max_sentences=args.max_sentences,
            seed=args.seed,
            verbose=args.verbose,
        )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {tok.path} ({args.model_type}) in {time.perf_counter() - t0:.1f}s")
    print(f"vocab size {tok.vocab_size}, sha256 {tok.sha256}")
    for path in args.input:
        n_chars, n_tokens = chars_per_token(tok, path, args.text_field)
        print(f"  {path}: {n_chars:,} chars / {n_tokens:,} tokens = {n_chars / max(n_tokens, 1):.2f} chars/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
