"""Long-context loss: per-position NLL and loss-so-far on long English and Japanese sequences, with chunked prefill.

`python -m fm_pretrain.eval.long_context --checkpoint RUN_DIR [--max-length 131072] [--chunk-size 2048]`

For each language, sequences of `max_length` tokens run through the model in chunks of C tokens that carry the
recurrent states (FM, Mamba-2) or the KV cache (attention) from chunk to chunk (`fm_pretrain.inference`), so the
activations take O(C) memory whatever the length; only the (T,) NLL vector of a sequence is kept (plus, for
attention, its KV cache, which grows with T). Two views of the NLL of the token at position p (predicted from
positions 0 ... p - 1), averaged over the sequences of a language:

- **loss-so-far** at length L: the mean NLL over positions 1 ... L - 1 (reported at L = 1K, 2K, 4K, ... and the
  full length): what a model scores on sequences of length L;
- **per-position NLL in buckets** [0, 128), [128, 256), [256, 512), ... (powers of two): whether tokens far into the
  context are predicted as well as early ones (flat or falling for a model that uses or tolerates the context,
  rising past the training length for one that breaks down).

**How sequences are formed.** Documents are taken longest first and concatenated whole, each as
`[bos] + tokens + [eos]` (the layout training packs), until the sequence holds `max_length` tokens; the last one
is cut there. The model runs over it as one sequence with no document reset (no doc_ids), so positions beyond the
first document's length see real text of other documents of the same language and source as context. Sequence
i starts where sequence i - 1 ended in that order, so no document is read twice. A language whose documents hold
fewer tokens than `n_sequences * max_length` gets fewer sequences, and, if not even one, one shorter sequence of
all its tokens (the report gives the length used). Longest first means position p of a sequence lies inside one
long document for as large a p as the corpus allows: the longest English document of `../shared/data/corpus` is a
94K-character Wikipedia article, Botchan's chapters and the Japanese manuals follow.

Sources: `--en FILE ...` / `--ja FILE ...` (JSON Lines with a `text` field, or any input `data_prep/pack.py`
reads); by default `../shared/data/corpus/` (en_wikipedia + en_botchan, ja_docs) when present, else the bundled
`data/tiny/`. `--packed DIR` adds the validation split of a packed directory, each document assigned to EN or JA
by its script (kana / CJK share, `is_japanese`).

Outputs: `long_context.json` and `long_context.png` (loss-so-far and bucket NLL against position, log scale, one
line per language, the training length marked) in `STEP_DIR/long_context/`; MLflow metrics
`long_context/<lang>/loss_so_far/<L>` and `long_context/<lang>/nll/<lo>-<hi>` at the checkpoint's step, and the
two files as artifacts under `long_context/step_<N>/` (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fm_pretrain.inference import iter_prefill, new_caches

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED_CORPUS = REPO.parent / "shared" / "data" / "corpus"
TINY_CORPUS = REPO / "data" / "tiny"
RESULTS_FILE = "long_context.json"
PLOT_FILE = "long_context.png"
METRIC_PREFIX = "long_context"
FIRST_BUCKET = 128  # positions [0, 128) form the first bucket, then powers of two
LANGS = ("en", "ja")


# --- sequences ---


def is_japanese(text: str, threshold: float = 0.2) -> bool:
    """True when at least `threshold` of the non-space characters are kana or CJK ideographs."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    ja = sum(1 for c in chars if unicodedata.name(c, "").startswith(("CJK UNIFIED", "HIRAGANA", "KATAKANA")))
    return ja / len(chars) >= threshold


def default_corpora() -> dict[str, list[Path]]:
    """The shared corpus when it is next to the repo, else the bundled tiny one."""
    if SHARED_CORPUS.is_dir():
        return {
            "en": [SHARED_CORPUS / "en_wikipedia.jsonl", SHARED_CORPUS / "en_botchan.jsonl"],
            "ja": [SHARED_CORPUS / "ja_docs.jsonl"],
        }
    return {"en": [TINY_CORPUS / "tiny_en.jsonl"], "ja": [TINY_CORPUS / "tiny_ja.jsonl"]}


def read_texts(paths: Iterable[Path]) -> list[str]:
    from fm_pretrain.data.readers import iter_documents

    return [text for p in paths for _, text in iter_documents(p) if text.strip()]


def packed_documents(data_dir: Path, split: str = "valid") -> list[np.ndarray]:
    """Every stored document ([bos] + tokens + [eos]) of one split of a packed directory (docs/data.md)."""
    from fm_pretrain.data.shards import read_meta

    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    docs = []
    for shard in meta["splits"][split]["shards"]:
        tokens = np.fromfile(Path(data_dir) / shard["bin"], dtype=dtype).astype(np.int64)
        offsets = np.load(Path(data_dir) / shard["idx"])
        docs += [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return docs


def build_sequences(docs: Sequence[Sequence[int]], length: int, n_sequences: int) -> list[list[int]]:
    """Concatenate `docs` (each already [bos] + tokens + [eos]) longest first into up to n_sequences sequences of
    `length` tokens (module docstring); one shorter sequence of everything when they hold fewer than `length`."""
    if length < 2 or n_sequences < 1:
        raise ValueError(f"need length >= 2 and n_sequences >= 1, got {length}, {n_sequences}")
    ordered = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    seqs: list[list[int]] = []
    current: list[int] = []
    for i in ordered:
        doc = list(docs[i])
        while doc:
            take = length - len(current)
            current += doc[:take]
            doc = doc[take:]
            if len(current) == length:
                seqs.append(current)
                current = []
                if len(seqs) == n_sequences:
                    return seqs
    if not seqs and len(current) >= 2:
        seqs.append(current)
    return seqs


def tokenize_longest(texts: Sequence[str], tok, budget: int) -> list[list[int]]:
    """[bos] + encode(text) + [eos] of the longest texts (by characters) until `budget` tokens are reached."""
    docs, total = [], 0
    for text in sorted(texts, key=len, reverse=True):
        docs.append([tok.bos_id, *tok.encode(text), tok.eos_id])
        total += len(docs[-1])
        if total >= budget:
            break
    return docs


# --- the NLL of every position ---


@torch.no_grad()
def position_nll(
    model: nn.Module, ids: torch.Tensor, chunk_size: int | None = None, progress: bool = False
) -> torch.Tensor:
    """ids (B, T) -> NLL (B, T - 1) in fp32 (fp64 for an fp64 model): entry p - 1 is -log P(ids[:, p] | ids[:, :p]).

    Chunked prefill in chunks of chunk_size (None: one forward); each chunk's logits (B, C, V) are reduced to
    their NLL at once and dropped, the last position of a chunk scoring the first token of the next."""
    B, T = ids.shape
    out = []
    chunks = iter_prefill(model, ids, new_caches(model), chunk_size)
    total = math.ceil(T / chunk_size) if chunk_size else 1
    for offset, logits in tqdm(chunks, total=total, desc="chunks", disable=not progress, leave=False):
        C = logits.shape[1]
        targets = ids[:, offset + 1 : offset + C + 1]
        logits = logits[:, : targets.shape[1]]
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        out.append(-logp.gather(-1, targets[..., None])[..., 0])
    return torch.cat(out, dim=1)


@torch.no_grad()
def position_nll_reference(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The same (B, T - 1) NLL from one full forward and cross_entropy (the test's twin of `position_nll`)."""
    logits = model(ids).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return flat.view(ids.shape[0], -1)


def loss_so_far(nll: torch.Tensor) -> torch.Tensor:
    """(..., N) per-position NLL -> (..., N) mean over the first 1, 2, ..., N of them."""
    n = torch.arange(1, nll.shape[-1] + 1, dtype=nll.dtype, device=nll.device)
    return nll.cumsum(-1) / n


def buckets(n_positions: int) -> list[tuple[int, int]]:
    """Bucket edges [lo, hi) over predicted positions 1 ... n_positions: [0, 128), [128, 256), [256, 512), ..."""
    edges, hi = [(0, FIRST_BUCKET)], FIRST_BUCKET
    while hi <= n_positions:
        edges.append((hi, 2 * hi))
        hi *= 2
    return [(lo, min(hi, n_positions + 1)) for lo, hi in edges if lo <= n_positions]


def report_lengths(length: int) -> list[int]:
    """1K, 2K, 4K, ... below `length`, then `length` itself."""
    out, L = [], 1024
    while L < length:
        out.append(L)
        L *= 2
    return [*out, length]


@dataclass(frozen=True)
class LongContextSettings:
    max_length: int = 131072
    n_sequences: int = 1
    chunk_size: int = 2048


def summarize(nll: torch.Tensor) -> dict[str, Any]:
    """nll (S, T - 1) of S sequences -> loss-so-far at the report lengths, bucket means and a log-spaced curve."""
    mean = nll.double().mean(0)  # (T - 1,): position p at index p - 1
    so_far = loss_so_far(mean)
    T = mean.shape[0] + 1
    lengths = report_lengths(T)
    per_bucket = []
    for lo, hi in buckets(T - 1):
        sl = mean[max(lo, 1) - 1 : hi - 1]
        per_bucket.append({"lo": lo, "hi": hi, "nll": float(sl.mean()), "positions": int(sl.numel())})
    curve_at = sorted({int(x) for x in np.unique(np.geomspace(1, T - 1, num=min(200, T - 1)).round())})
    return {
        "length": T,
        "loss_so_far": {str(L): float(so_far[L - 2]) for L in lengths},
        "buckets": per_bucket,
        "curve": {"position": curve_at, "loss_so_far": [float(so_far[p - 1]) for p in curve_at]},
    }


def evaluate_long_context(
    model: nn.Module,
    tok,
    documents: dict[str, Sequence[Sequence[int]]],
    settings: LongContextSettings = LongContextSettings(),
    progress: bool = True,
) -> dict[str, Any]:
    """Per language: sequences from its documents ([bos] + tokens + [eos] each), their NLL with chunked prefill,
    summarised (`summarize`). Returns {"settings", "languages": {lang: {...}}}."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    try:
        for lang, docs in documents.items():
            seqs = build_sequences(docs, settings.max_length, settings.n_sequences)
            if not seqs:
                log.warning("%s: no documents; skipped", lang)
                continue
            if len(seqs[0]) < settings.max_length:
                log.warning("%s: the documents hold %d tokens, fewer than %d: one sequence of them all", lang,
                            len(seqs[0]), settings.max_length)  # fmt: skip
            nll = torch.stack([
                position_nll(model, torch.tensor([s], device=device), settings.chunk_size, progress)[0].cpu()
                for s in tqdm(seqs, desc=f"long context {lang}", disable=not progress)
            ])  # fmt: skip
            out[lang] = {"n_sequences": len(seqs), **summarize(nll)}
    finally:
        model.train(was_training)
    return {"settings": asdict(settings), "languages": out}


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{long_context/<lang>/loss_so_far/<L>: v, long_context/<lang>/nll/<lo>-<hi>: v}."""
    out = {}
    for lang, res in results["languages"].items():
        for L, v in res["loss_so_far"].items():
            out[f"{METRIC_PREFIX}/{lang}/loss_so_far/{L}"] = v
        for b in res["buckets"]:
            out[f"{METRIC_PREFIX}/{lang}/nll/{b['lo']}-{b['hi']}"] = b["nll"]
    return out


def plot_long_context(results: dict[str, Any], out: Path, title: str, train_length: int | None = None) -> Path:
    """Two panels against position (log x): loss-so-far, and the mean NLL of each bucket; one line per language."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_sofar, ax_bucket = fig.subplots(1, 2)
    for lang, res in results["languages"].items():
        ax_sofar.plot(res["curve"]["position"], res["curve"]["loss_so_far"], label=lang)
        mids = [math.sqrt(max(b["lo"], 1) * b["hi"]) for b in res["buckets"]]
        ax_bucket.plot(mids, [b["nll"] for b in res["buckets"]], marker="o", label=lang)
    for ax, name in ((ax_sofar, "loss so far (mean NLL over positions 1..t)"), (ax_bucket, "mean NLL per bucket")):
        ax.set_xscale("log")
        ax.set_xlabel("position t (tokens)")
        ax.set_ylabel(name)
        if train_length:
            ax.axvline(train_length, color="grey", linestyle="--", label=f"training length {train_length}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


# --- command line ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.eval.long_context", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", type=Path, required=True, help="RUN_DIR, RUN_DIR/checkpoints or a step_N dir")
    p.add_argument("--max-length", type=int, default=LongContextSettings.max_length)
    p.add_argument("--n-sequences", type=int, default=LongContextSettings.n_sequences, help="per language")
    p.add_argument("--chunk-size", type=int, default=LongContextSettings.chunk_size, help="prefill chunk (tokens)")
    p.add_argument("--en", type=Path, nargs="+", help="English documents (default: the shared or bundled corpus)")
    p.add_argument("--ja", type=Path, nargs="+", help="Japanese documents (default: the shared or bundled corpus)")
    p.add_argument("--packed", type=Path, help="also the validation split of this packed directory (EN/JA by script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the run's data.tokenizer")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def gather_documents(args: argparse.Namespace, tok, budget: int) -> dict[str, list[list[int]]]:
    corpora = default_corpora()
    paths = {"en": args.en or corpora["en"], "ja": args.ja or corpora["ja"]}
    docs = {lang: tokenize_longest(read_texts(paths[lang]), tok, budget) for lang in LANGS}
    if args.packed is not None:
        for doc in packed_documents(args.packed):
            docs["ja" if is_japanese(tok.decode(doc.tolist())) else "en"].append(doc.tolist())
    return docs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fm_pretrain.config import ConfigError

    from .cli import load_for_eval
    from .report import write_results
    from .run_logging import log_offline_eval

    settings = LongContextSettings(args.max_length, args.n_sequences, args.chunk_size)
    try:
        step_dir, model, cfg, meta, tok = load_for_eval(args.checkpoint, args.device, args.dtype, args.tokenizer)
        docs = gather_documents(args, tok, settings.max_length * settings.n_sequences)
        results = evaluate_long_context(model, tok, docs, settings, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, KeyError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = int(meta["step"])
    run_dir = step_dir.resolve().parent.parent
    results = {"checkpoint": str(step_dir.resolve()), "step": step, "model_type": cfg.model.model_type,
               "dtype": args.dtype, "train_length": cfg.data.seq_len, **results}  # fmt: skip
    out_dir = step_dir / "long_context"
    out_dir.mkdir(exist_ok=True)
    files = [write_results(results, out_dir / RESULTS_FILE)]
    files.append(plot_long_context(results, out_dir / PLOT_FILE, f"{run_dir.name} step {step}", cfg.data.seq_len))
    for lang, res in results["languages"].items():
        sofar = "  ".join(f"{int(L) // 1024}K {v:.3f}" if int(L) >= 1024 else f"{L} {v:.3f}"
                          for L, v in res["loss_so_far"].items())  # fmt: skip
        print(f"{lang}: {res['n_sequences']} x {res['length']} tokens; loss so far: {sofar}")
    print(f"results: {files[0]}\nplot: {files[1]}")
    if args.no_mlflow or not cfg.tracking.enabled:
        return 0
    tags = {"model_type": cfg.model.model_type, "size": cfg.tracking.size or "unknown", "run_dir": str(run_dir)}
    run_id = log_offline_eval(run_dir, cfg.tracking, step, flat_metrics(results), files,
                              f"{METRIC_PREFIX}/step_{step}", "long-context", tags)  # fmt: skip
    print(f"MLflow: {METRIC_PREFIX}/<lang>/... at step {step} in run {run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
