"""Multi-query associative recall (MQAR, after the Zoology benchmark): a synthetic recall task for small models.

An example of T tokens holds N key-value pairs, then queries: each key again, at a later position, and the model
must produce its value right after it.

    k1 v1 k2 v2 ... kN vN | f f k3 v3 f k1 v1 f f f k2 v2 ...      (f: the filler token)

Keys are N distinct ids from the lower half of the usable ids, values ids from the upper half (repeats allowed);
every pair is queried once, in random order, at pair-aligned slots of the query section. Slot s (0-based) is
chosen with probability proportional to a * (s + 1)^(a - 1) (Zoology's power law on the distance: a < 1 puts
queries near the pairs, a = 1 spreads them evenly); slots are drawn without replacement. Only the query keys carry
a label (their value); every other position is IGNORE_INDEX. Ids below `first_id` (pad, unk, bos, eos) and the
filler id never occur as keys or values.

Library: `mqar_examples(n, MQARConfig(...), seed) -> (input_ids, labels)` (n, T) and `mqar_accuracy(model, ...)`.
Command line (the training data tools' side): `python -m fm_pretrain.eval.mqar --output DIR --tokenizer TOK.model`
writes a packed directory (docs/data.md format: each example one document `[bos] + example + [eos]`, a `train`
and a `valid` split) that `train.py` reads with `data.path=DIR data.seq_len=T+2`. Training on it optimises the next
token everywhere, so the key-value section is irreducible noise by design; `mqar_accuracy` scores the queries.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fm_pretrain.data import IGNORE_INDEX


@dataclass(frozen=True)
class MQARConfig:
    seq_len: int = 256  # T, tokens per example
    num_kv_pairs: int = 16  # N
    vocab_size: int = 8192  # ids used: [first_id + 1, vocab_size)
    first_id: int = 4  # ids below are special tokens; first_id itself is the filler
    power_a: float = 0.01  # query placement power law (module docstring)

    def __post_init__(self) -> None:
        usable = self.vocab_size - self.first_id - 1
        if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"need 1 <= num_kv_pairs and 4 * num_kv_pairs <= seq_len, got {self}")
        if usable // 2 < self.num_kv_pairs:
            raise ValueError(f"vocab_size {self.vocab_size}: too few ids for {self.num_kv_pairs} distinct keys")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")

    @property
    def filler_id(self) -> int:
        return self.first_id

    @property
    def key_range(self) -> tuple[int, int]:
        lo = self.first_id + 1
        return lo, lo + (self.vocab_size - lo) // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.key_range[1], self.vocab_size


def mqar_examples(n: int, cfg: MQARConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples: input_ids (n, T) int64 and labels (n, T) int64, labels[i, p] the value to predict at the query key
    at position p (IGNORE_INDEX elsewhere)."""
    rng = np.random.default_rng(seed)
    T, N = cfg.seq_len, cfg.num_kv_pairs
    (k_lo, k_hi), (v_lo, v_hi) = cfg.key_range, cfg.value_range
    n_slots = (T - 2 * N) // 2
    slot_p = cfg.power_a * np.arange(1, n_slots + 1, dtype=np.float64) ** (cfg.power_a - 1)
    slot_p /= slot_p.sum()
    ids = np.full((n, T), cfg.filler_id, dtype=np.int64)
    labels = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
    for i in range(n):
        keys = rng.choice(np.arange(k_lo, k_hi), size=N, replace=False)
        values = rng.integers(v_lo, v_hi, size=N)
        ids[i, 0 : 2 * N : 2], ids[i, 1 : 2 * N : 2] = keys, values
        slots = np.sort(rng.choice(n_slots, size=N, replace=False, p=slot_p))
        order = rng.permutation(N)
        pos = 2 * N + 2 * slots
        ids[i, pos], ids[i, pos + 1] = keys[order], values[order]
        labels[i, pos] = values[order]
    return torch.from_numpy(ids), torch.from_numpy(labels)


@torch.no_grad()
def mqar_accuracy(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    """Share of query positions (labels != IGNORE_INDEX) where the model's argmax is the value."""
    device = next(model.parameters()).device
    hit, total = 0, 0
    for s in range(0, input_ids.shape[0], batch_size):
        ids, lab = input_ids[s : s + batch_size].to(device), labels[s : s + batch_size].to(device)
        pred = model(ids).logits.argmax(-1)
        mask = lab != IGNORE_INDEX
        hit += int((pred[mask] == lab[mask]).sum())
        total += int(mask.sum())
    return hit / total


def write_packed(out_dir: Path, cfg: MQARConfig, n_train: int, n_valid: int, seed: int, tokenizer) -> Path:
    """A packed directory of MQAR examples (module docstring) for `tokenizer`'s ids (its hash goes into meta.json,
    which train.py checks); bos/eos/pad come from the tokenizer."""
    from fm_pretrain.data.shards import FORMAT_NAME, FORMAT_VERSION, commit_shard, shard_name, token_dtype, write_meta

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(cfg.vocab_size)
    splits = {}
    for k, (split, n) in enumerate((("train", n_train), ("valid", n_valid))):
        ids, _ = mqar_examples(n, cfg, seed * 2 + k)
        docs = np.concatenate(
            [np.full((n, 1), tokenizer.bos_id), ids.numpy(), np.full((n, 1), tokenizer.eos_id)], axis=1
        )
        name = shard_name(split, 0)
        (out_dir / f"{name}.bin.tmp").write_bytes(docs.astype(dtype).tobytes())
        shard = commit_shard(out_dir, name, np.arange(n + 1, dtype=np.int64) * docs.shape[1])
        splits[split] = {"num_tokens": shard["tokens"], "num_docs": n, "shards": [shard]}
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": dtype.name, "byte_order": "little",
        "vocab_size": cfg.vocab_size, "tokenizer_sha256": tokenizer.sha256, "tokenizer_path": str(tokenizer.path),
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "document_layout": "[bos] + tokens + [eos]", "seed": seed, "synthetic": {"task": "mqar", **asdict(cfg)},
        "splits": splits, "docs_packed": {s: v["num_docs"] for s, v in splits.items()},
    }  # fmt: skip
    write_meta(out_dir, meta)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.eval.mqar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--output", type=Path, required=True, help="packed directory to write")
    p.add_argument("--tokenizer", type=Path, required=True, help="the run's sentencepiece model (ids, hash)")
    p.add_argument("--seq-len", type=int, default=MQARConfig.seq_len)
    p.add_argument("--num-kv-pairs", type=int, default=MQARConfig.num_kv_pairs)
    p.add_argument("--power-a", type=float, default=MQARConfig.power_a)
    p.add_argument("--train", type=int, default=20000, help="training examples")
    p.add_argument("--valid", type=int, default=500, help="validation examples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from fm_pretrain.data.tokenizer import Tokenizer

    try:
        tok = Tokenizer(args.tokenizer)
        cfg = MQARConfig(args.seq_len, args.num_kv_pairs, tok.vocab_size, power_a=args.power_a)
        out = write_packed(args.output, cfg, args.train, args.valid, args.seed, tok)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: MQAR {args.train} train + {args.valid} valid examples of {cfg.seq_len} tokens "
          f"({cfg.num_kv_pairs} pairs); train with data.path={out} data.seq_len={cfg.seq_len + 2}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
