"""`python -m fm_pretrain.generate --checkpoint RUN_DIR --prompt "..." [--prompt ...] [--stream]`

Rebuilds the model of a checkpoint (a step_N directory, or the latest of a run or checkpoints directory) at
tensor_parallel = 1, tokenizes the prompts with the run's tokenizer (bos first) and generates: greedy by default,
or sampled (--temperature, --top-k, --top-p, --repetition-penalty, --seed), until eos, a --stop string or
--max-new-tokens. Prompts of different lengths share left-padded batches (docs/inference.md); --stream prints
the text as it is produced, one prompt after the other. --json prints one JSON object per prompt instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from fm_pretrain.config import ConfigError
from fm_pretrain.inference import SamplingParams, generate_text

log = logging.getLogger("fm_pretrain.generate")


def unescape(text: str) -> str:
    r"""Command-line escapes in --prompt / --stop: \n newline, \t tab, \\ backslash (anything else unchanged)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", type=Path, required=True, help="RUN_DIR, RUN_DIR/checkpoints or a step_N dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; \\n is a newline)")
    p.add_argument("--prompt-file", type=Path, help="more prompts: one per line (\\n escapes allowed)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling generator")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; \\n is a newline)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill long prompts in chunks of N tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the run's data.tokenizer")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, text, finish, tokens")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from fm_pretrain.eval.cli import load_for_eval

    prompts = [unescape(p) for p in args.prompt]
    if args.prompt_file is not None:
        prompts += [unescape(line) for line in args.prompt_file.read_text(encoding="utf-8").splitlines() if line]
    if not prompts:
        print("error: give at least one --prompt (or --prompt-file)", file=sys.stderr)
        return 2
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        step_dir, model, cfg, meta, tok = load_for_eval(args.checkpoint, args.device, args.dtype, args.tokenizer)
    except (FileNotFoundError, ValueError, KeyError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = dict(
        sampling=sampling, stop_strings=[unescape(s) for s in args.stop], stop_at_eos=not args.no_eos,
        seed=args.seed, prefill_chunk=args.prefill_chunk,
    )  # fmt: skip
    if args.stream and not args.json:
        for i, prompt in enumerate(prompts):  # one at a time, so the streamed text is never interleaved
            if len(prompts) > 1:
                print(f"=== prompt {i + 1}: {prompt!r}", flush=True)

            def emit(_: int, piece: str) -> None:
                sys.stdout.write(piece)
                sys.stdout.flush()

            generate_text(model, tok, [prompt], args.max_new_tokens, batch_size=1, stream=emit, **options)
            print(flush=True)
        return 0
    results = generate_text(model, tok, prompts, args.max_new_tokens, batch_size=args.batch_size, **options)
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        if args.json:
            row = {"prompt": prompt, "text": res.text, "finish": res.finish, "tokens": res.token_ids}
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            if len(prompts) > 1:
                print(f"=== prompt {i + 1}: {prompt!r} ({res.finish})")
            print(res.text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
