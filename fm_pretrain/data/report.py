"""What a packed directory holds (the logic behind data_prep/inspect_packed.py): counts, lengths, decoded samples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fm_pretrain.data.shards import read_meta
from fm_pretrain.data.tokenizer import Tokenizer


def doc_lengths(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """Stored length (tokens, bos/eos included) of every document of a split, in order."""
    meta = read_meta(data_dir)
    parts = [np.diff(np.load(Path(data_dir) / s["idx"])) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _doc_tokens(data_dir: Path, meta: dict[str, Any], split: str, k: int) -> np.ndarray:
    """Document k of a split, read from its shard."""
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    for s in meta["splits"][split]["shards"]:
        if k < s["docs"]:
            idx = np.load(data_dir / s["idx"])
            tokens = np.memmap(data_dir / s["bin"], dtype=dtype, mode="r", shape=(s["tokens"],))
            return np.asarray(tokens[idx[k] : idx[k + 1]], dtype=np.int64)
        k -= s["docs"]
    raise IndexError(f"document {k} out of range")


def histogram_png(lengths: dict[str, np.ndarray], path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max((int(v.max()) for v in lengths.values() if len(v)), default=2)
    bins = np.logspace(0, np.log10(max(top, 2)), 40)
    for split, v in lengths.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{split} ({len(v):,} docs)")
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens, with bos/eos)")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inspect_packed(
    data_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    samples: int = 3,
    sample_chars: int = 300,
    plot: str | os.PathLike | None = None,
    seed: int = 0,
) -> str:
    """A text report; writes the document-length histogram to `plot` when given."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    lines = [f"{data_dir}: vocab {meta['vocab_size']}, tokenizer {meta['tokenizer_sha256'][:12]}, {meta['dtype']}"]
    lines.append(f"docs in {meta.get('docs_in', '?')}, rejected {meta.get('rejected', {})}")
    lines.append("tokens per source (with bos/eos):")
    for s in meta.get("sources", []):
        tokens = s.get("tokens")
        if isinstance(tokens, dict):  # older packings did not count tokens per source
            docs = s.get("docs", {})
            lines.append(
                f"  {s['path']}: train {tokens['train']:,} tokens / {docs.get('train', 0):,} docs, "
                f"valid {tokens['valid']:,} / {docs.get('valid', 0):,}"
            )
        else:
            lines.append(f"  {s['path']}: docs_in {s.get('docs_in')}")
    lengths = {split: doc_lengths(data_dir, split) for split in meta["splits"]}
    for split, v in lengths.items():
        if len(v):
            q = np.percentile(v, [50, 90, 99])
            lines.append(
                f"{split}: {len(v):,} docs, {int(v.sum()):,} tokens; length min {v.min()}, median {q[0]:.0f}, "
                f"p90 {q[1]:.0f}, p99 {q[2]:.0f}, max {v.max()}"
            )
        else:
            lines.append(f"{split}: no documents")
    if plot is not None:
        histogram_png(lengths, plot, f"document lengths: {data_dir.name}")
        lines.append(f"histogram written to {plot}")
    tok_path = tokenizer_path or meta.get("tokenizer_path")
    if samples and tok_path and Path(tok_path).is_file() and len(lengths.get("train", [])):
        tok = Tokenizer(tok_path)
        if tok.sha256 != meta["tokenizer_sha256"]:
            lines.append(f"warning: {tok_path} is not the tokenizer this data was packed with")
        rng = np.random.default_rng(seed)
        for k in sorted(rng.choice(len(lengths["train"]), size=min(samples, len(lengths["train"])), replace=False)):
            ids = _doc_tokens(data_dir, meta, "train", int(k))
            text = tok.decode(ids[1:-1])
            lines.append(f"--- train doc {k} ({len(ids)} tokens): {text[:sample_chars]!r}")
    elif samples:
        lines.append("(no tokenizer found to decode samples: pass --tokenizer)")
    return "\n".join(lines)
