"""Reading packed token shards (PackedDataset) and the step-wise sampling; the format is in shards.py.

Each document is stored as [bos] + tokens + [eos]; documents never span shards (docs/data.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fm_pretrain.data import IGNORE_INDEX, DataError

# Re-exported: older code imports the format helpers from here.
from fm_pretrain.data.shards import (  # noqa: F401
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    read_meta,
    shard_name,
    token_dtype,
)


class PackedDataset(torch.utils.data.Dataset):
    """One split of a packed directory as a single concatenated token stream, cut into fixed windows.

    Sample i covers stream tokens [i*seq_len, i*seq_len + seq_len + 1): `input_ids` are the first
    seq_len, `labels` the next token of each position (IGNORE_INDEX where that next token starts another
    document), `doc_ids` the document of each position, renumbered from 0 within the sample.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        seq_len: int,
        expect_tokenizer_sha256: str | None = None,
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.split = split
        self.seq_len = seq_len
        if split not in self.meta["splits"]:
            raise KeyError(f"{self.data_dir}: no split {split!r} (have {sorted(self.meta['splits'])})")
        if expect_tokenizer_sha256 is not None and expect_tokenizer_sha256 != self.meta["tokenizer_sha256"]:
            raise DataError(
                f"{self.data_dir}: packed with tokenizer sha256 {self.meta['tokenizer_sha256'][:12]}..., "
                f"but the configured tokenizer is {expect_tokenizer_sha256[:12]}..."
            )
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._shards: list[np.ndarray] = []
        doc_starts: list[np.ndarray] = []
        offset = 0
        for shard in self.meta["splits"][split]["shards"]:
            bin_path, idx_path = self.data_dir / shard["bin"], self.data_dir / shard["idx"]
            for p in (bin_path, idx_path):
                if not p.is_file():
                    raise FileNotFoundError(f"shard file not found: {p}")
            if bin_path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(
                    f"{bin_path}: {bin_path.stat().st_size} bytes, meta.json says "
                    f"{shard['tokens']} tokens of {dtype.itemsize} bytes (truncated or stale shard?)"
                )
            idx = np.load(idx_path)
            if len(idx) != shard["docs"] + 1 or idx[0] != 0 or idx[-1] != shard["tokens"]:
                raise DataError(f"{idx_path}: offsets do not match meta.json ({shard['docs']} docs)")
            self._shards.append(np.memmap(bin_path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
            doc_starts.append(idx[:-1] + offset)
            offset += shard["tokens"]
        self.num_tokens = offset
        self.num_docs = sum(len(d) for d in doc_starts)
        self._shard_starts = np.cumsum([0] + [len(s) for s in self._shards])
        # Global start of every document, then the end sentinel: doc of position p = searchsorted - 1.
        self._doc_starts = np.concatenate(doc_starts + [np.array([offset], dtype=np.int64)])

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Stream tokens [start, end) as int64, across shard boundaries."""
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        parts = []
        pos = start
        for s in range(first, len(self._shards)):
            if pos >= end:
                break
            lo = pos - self._shard_starts[s]
            hi = min(end, self._shard_starts[s + 1]) - self._shard_starts[s]
            parts.append(self._shards[s][lo:hi])
            pos = self._shard_starts[s] + hi
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples ({self.split})")
        start = i * self.seq_len
        window = self.tokens(start, start + self.seq_len + 1)
        docs = np.searchsorted(self._doc_starts, np.arange(start, start + self.seq_len + 1), side="right") - 1
        labels = window[1:].copy()
        labels[docs[1:] != docs[:-1]] = IGNORE_INDEX  # never predict across a document boundary
        return {
            "input_ids": torch.from_numpy(window[:-1].copy()),
            "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy((docs[:-1] - docs[0]).astype(np.int64)),
        }


class GlobalSampler:
    """Maps the global sample number n (0, 1, 2, ... over the whole run) to a dataset index.

    Epoch e = n // num_samples visits every sample once, in a permutation seeded by (seed, e). The order
    is a function of n alone, so it does not depend on the data-parallel size and resumes exactly from
    any consumed-sample count.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step touches at most two epochs; keep memory bounded
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_samples)
        return self._perms[epoch]

    def index(self, n: int) -> int:
        if n < 0:
            raise IndexError(f"global sample number must be >= 0, got {n}")
        epoch, k = divmod(n, self.num_samples)
        return int(self._perm(epoch)[k]) if self.shuffle else k


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def micro_batches(
    dataset: PackedDataset,
    sampler: GlobalSampler,
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches for the optimizer step over global samples [consumed, consumed + G).

    Rank r takes the contiguous slice [r*G/dp, (r+1)*G/dp) of the global batch, split into micro-batches
    of `micro_batch_size` samples, each a dict of (micro_batch_size, seq_len) int64 tensors.
    """
    g, m = global_batch_size, micro_batch_size
    if g <= 0 or m <= 0 or dp_size <= 0:
        raise ValueError(f"batch sizes and dp_size must be > 0 (global={g}, micro={m}, dp={dp_size})")
    if g % (dp_size * m) != 0:
        raise ValueError(f"global_batch_size {g} is not divisible by dp_size {dp_size} * micro_batch_size {m}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
    per_rank = g // dp_size
    first = consumed_samples + dp_rank * per_rank
    return [
        collate([dataset[sampler.index(n)] for n in range(first + j, first + j + m)]) for j in range(0, per_rank, m)
    ]
