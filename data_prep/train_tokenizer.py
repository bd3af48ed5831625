"""Train a sentencepiece tokenizer on a weighted sample of corpora (EN/JA by design).

    python data_prep/train_tokenizer.py --input en.jsonl ja.jsonl.zst --lang en ja --weight 0.4 0.6 \
        --output-prefix out/tok --vocab-size 32000 [--model-type unigram|bpe] [--reserved-tokens 16]

Streams each input once (a reservoir sample of its lines, sized by its weight, so inputs may be larger
than memory), holds out documents to measure, and writes out/tok.model, out/tok.vocab and
out/tok.card.json (vocabulary, special ids, sample, characters per token per language on held-out
text). The logic lives in fm_pretrain.data.tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fm_pretrain.data import DataError
from fm_pretrain.data.tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files (.jsonl[.gz|.zst], .parquet, .txt) or datasets")
    ap.add_argument("--lang", nargs="+", default=None, help="language label per input (default: file stem)")
    ap.add_argument("--weight", nargs="+", type=float, default=None, help="sampling weight per input (default: 1)")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab, PREFIX.card.json")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training, in all")
    ap.add_argument("--reserved-tokens", type=int, default=0, help="extra ids <reserved_0>... right after eos")
    ap.add_argument("--character-coverage", type=float, default=0.9995, help="0.9995 suits Japanese")
    ap.add_argument("--heldout-fraction", type=float, default=0.05, help="documents held out to measure")
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
            weights=args.weight,
            langs=args.lang,
            reserved_tokens=args.reserved_tokens,
            character_coverage=args.character_coverage,
            heldout_fraction=args.heldout_fraction,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    card_path = Path(f"{args.output_prefix}.card.json")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    print(f"wrote {tok.path} ({args.model_type}) and {card_path} in {time.perf_counter() - t0:.1f}s")
    print(f"vocab size {tok.vocab_size}, sha256 {tok.sha256}")
    for s in card["training_sample"]:
        sampled = f"{s['lines_sampled']:,} of {s['lines_seen']:,} lines"
        print(f"  {s['path']} [{s['lang']}, weight {s['weight']:g}]: {sampled}")
    for lang, h in card["heldout"].items():
        cpt = f"{h['chars_per_token']:.2f}" if h["chars_per_token"] else "n/a (no held-out document)"
        measured = f"{h['chars']:,} chars / {h['tokens']:,} tokens"
        print(f"  {lang}: held-out {h['heldout_docs']} docs, {measured} = {cpt} chars/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
