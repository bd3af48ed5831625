"""Weighted blends of packed directories, and the training data the trainer consumes (see docs/data.md).

A blend spec is a YAML file:

    seed: 1234                      # optional; else data.seed
    train:
      - {path: packed/en, weight: 0.3}     # paths relative to this file; split defaults to the section
      - {path: packed/ja, weight: 0.7}
    valid:                          # optional; default: the train entries' "valid" splits, same weights
      - {path: packed/ja, weight: 1.0, split: valid}

`BlendSampler.index(n)` maps the global sample number n of the run to a sample of one source. Like
GlobalSampler it is a function of n alone: the same global order for any data-parallel size, and exact
resume from the consumed-samples counter in the checkpoint. Blocks of B samples hold each source's
share of the cumulative apportionment (so after any m samples source k has floor or ceil of w_k * m
samples at each block boundary), in a seeded shuffled order; each source walks its own seeded epochs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from fm_pretrain.data import DataError
from fm_pretrain.data.packed import GlobalSampler, PackedDataset

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class BlendEntry:
    path: Path
    weight: float
    split: str


@dataclass(frozen=True)
class BlendSpec:
    source: Path  # the YAML file, for messages
    seed: int | None
    splits: dict[str, list[BlendEntry]]  # "train" and "valid"


def _entries(raw: Any, section: str, where: Path) -> list[BlendEntry]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {section}: expected a non-empty list of {{path, weight}} entries")
    entries = []
    for i, item in enumerate(raw):
        key = f"{section}[{i}]"
        if not isinstance(item, dict) or "path" not in item:
            raise DataError(f"{where}: {key}: expected a mapping with 'path' and 'weight', got {item!r}")
        unknown = set(item) - {"path", "weight", "split"}
        if unknown:
            raise DataError(f"{where}: {key}: unknown keys {sorted(unknown)} (allowed: path, weight, split)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise DataError(f"{where}: {key}.weight: must be a number > 0, got {weight!r}")
        path = Path(str(item["path"]))
        path = path if path.is_absolute() else where.parent / path
        entries.append(BlendEntry(path, float(weight), str(item.get("split", section))))
    return entries


def load_blend(path: str | os.PathLike) -> BlendSpec:
    where = Path(path)
    if not where.is_file():
        raise FileNotFoundError(f"blend spec not found: {where}")
    try:
        raw = yaml.safe_load(where.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: top level must be a mapping with 'train' (and optionally 'valid', 'seed')")
    unknown = set(raw) - {"train", "valid", "seed"}
    if unknown:
        raise DataError(f"{where}: unknown keys {sorted(unknown)} (allowed: train, valid, seed)")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DataError(f"{where}: seed: expected an integer, got {seed!r}")
    train = _entries(raw.get("train"), "train", where)
    if "valid" in raw:
        valid = _entries(raw["valid"], "valid", where)
    else:
        valid = [BlendEntry(e.path, e.weight, "valid") for e in train]
    return BlendSpec(where, seed, {"train": train, "valid": valid})


def apportion(weights: np.ndarray, m: int) -> np.ndarray:
    """Largest-remainder split of m samples by `weights` (normalized): sums to m, each within 1 of w*m."""
    exact = weights * m
    counts = np.floor(exact).astype(np.int64)
    short = m - int(counts.sum())
    if short:
        order = np.argsort(-(exact - counts), kind="stable")  # ties go to the earlier source
        counts[order[:short]] += 1
    return counts


class BlendSampler:
    """Global sample number n -> index into a BlendedDataset; a function of n alone (see the module doc)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, shuffle: bool = True) -> None:
        if not sizes or len(sizes) != len(weights):
            raise ValueError(f"need one weight per source, got {len(sizes)} sizes and {len(weights)} weights")
        if any(s <= 0 for s in sizes) or any(w <= 0 for w in weights):
            raise ValueError(f"sizes and weights must be > 0, got {sizes} and {weights}")
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed = seed
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # Every source gets >= 10 samples per block, so per-block shares are never negative.
        self.block = max(1024, math.ceil(10 / float(self.weights.min())))
        self._sources = [GlobalSampler(n, seed=seed * 7919 + k, shuffle=shuffle) for k, n in enumerate(sizes)]
        self._cached: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source of each position, its rank among that source's positions, samples of each source before b)."""
        if self._cached is None or self._cached[0] != b:
            before = apportion(self.weights, b * self.block)
            share = apportion(self.weights, (b + 1) * self.block) - before
            seq = np.random.default_rng([self.seed, b]).permutation(np.repeat(np.arange(len(share)), share))
            rank = np.empty(len(seq), dtype=np.int64)
            for k in range(len(share)):
                pos = np.flatnonzero(seq == k)
                rank[pos] = np.arange(len(pos))
            self._cached = (b, seq, rank, before)
        return self._cached[1:]

    def source_of(self, n: int) -> tuple[int, int]:
        """(source k, how many samples of source k come before global sample n)."""
        if n < 0:
            raise IndexError(f"global sample number must be >= 0, got {n}")
        b, j = divmod(n, self.block)
        seq, rank, before = self._block(b)
        k = int(seq[j])
        return k, int(before[k] + rank[j])

    def index(self, n: int) -> int:
        k, m = self.source_of(n)
        return int(self.offsets[k]) + self._sources[k].index(m)


class BlendedDataset(torch.utils.data.Dataset):
    """Several PackedDatasets end to end: flat index i -> the source holding it."""

    def __init__(self, datasets: list[PackedDataset]) -> None:
        self.datasets = datasets
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets])]).astype(np.int64)
        self.seq_len = datasets[0].seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.datasets[k][i - int(self.offsets[k])]


def open_split(spec: BlendSpec, split: str, seq_len: int, sha: str | None, seed: int, shuffle: bool) -> tuple:
    datasets, weights = [], []
    for i, e in enumerate(spec.splits[split]):
        try:
            ds = PackedDataset(e.path, e.split, seq_len, expect_tokenizer_sha256=sha)
        except (DataError, KeyError, FileNotFoundError) as err:
            kind = FileNotFoundError if isinstance(err, FileNotFoundError) else DataError
            raise kind(f"{spec.source}: {split}[{i}] ({e.path}): {err}") from None
        if len(ds) == 0:
            raise DataError(
                f"{spec.source}: {split}[{i}] ({e.path}, split {e.split!r}) has no sample of {seq_len + 1} tokens"
            )
        sha = sha or ds.meta["tokenizer_sha256"]  # every source must share the first one's tokenizer
        datasets.append(ds)
        weights.append(e.weight)
    sampler = BlendSampler([len(d) for d in datasets], weights, seed, shuffle=shuffle)
    return BlendedDataset(datasets), sampler, sha
