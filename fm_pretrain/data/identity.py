"""Which data a checkpoint was trained on, recorded in its meta.json and compared on resume.

The checkpoint's data position is a global sample count (`consumed_samples`); it continues the same run only if
the same global sample order follows it. That order is determined by: the sampler (one packed directory:
`GlobalSampler`; a blend: `BlendSampler`, another order even for a single source), its seed, seq_len (which cuts
the token stream into samples), and every training source with its (normalized) blend weight and the content of
its packed split. The content is fingerprinted from the packed directory's meta.json, cheaply: the tokenizer
hash, token dtype, the split's shard list (token and document counts) and the content hashes of the raw inputs
the packer recorded. Paths are recorded too but not compared: moved or copied data is the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

from fm_pretrain.data import DataError
from fm_pretrain.data.blend import BlendedDataset, BlendSampler
from fm_pretrain.data.packed import GlobalSampler, PackedDataset

log = logging.getLogger(__name__)

META_KEY = "data"  # the key in the checkpoint's meta.json
ALLOW_FLAG = "train.allow_data_change"


class DataChangedError(DataError):
    """The data of this run would not continue the checkpoint's sample order."""


def packed_fingerprint(meta: dict[str, Any], split: str) -> str:
    """sha256 (hex) of what fixes the token stream of one split of a packed directory, from its meta.json."""
    sources = [s.get("sha256") or s.get("path") for s in meta.get("sources", [])]
    content = {
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "dtype": meta.get("dtype"),
        "split": split,
        "shards": [(s["tokens"], s["docs"]) for s in meta["splits"][split]["shards"]],
        "sources": sources,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def data_identity(train: PackedDataset | BlendedDataset, sampler: GlobalSampler | BlendSampler) -> dict[str, Any]:
    """The record stored under meta.json's "data": everything that determines the global sample order."""
    datasets = train.datasets if isinstance(train, BlendedDataset) else [train]
    if isinstance(sampler, BlendSampler):
        kind, weights = "blend", [float(w) for w in sampler.weights]
    else:
        kind, weights = "global", [1.0]
    return {
        "sampler": kind,
        "seed": int(sampler.seed),
        "seq_len": int(train.seq_len),
        "sources": [
            {
                "fingerprint": packed_fingerprint(ds.meta, ds.split),
                "weight": w,
                "split": ds.split,
                "path": str(ds.data_dir),  # informational, not compared
            }
            for ds, w in zip(datasets, weights, strict=True)
        ],
    }


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every compared key that differs (weights equal to 1e-9 relative)."""
    keys = ("sampler", "seed", "seq_len")
    diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    a, b = saved.get("sources", []), current.get("sources", [])
    if len(a) != len(b):
        paths = [[s.get("path") for s in a], [s.get("path") for s in b]]
        return [*diffs, f"sources: {len(a)} -> {len(b)} (paths {paths[0]} -> {paths[1]})"]
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        where = f"sources[{i}]"
        if x.get("fingerprint") != y.get("fingerprint"):
            diffs.append(f"{where}.fingerprint: {str(x.get('fingerprint'))[:12]}... ({x.get('path')}) -> "
                         f"{str(y.get('fingerprint'))[:12]}... ({y.get('path')})")  # fmt: skip
        if not math.isclose(float(x.get("weight", math.nan)), float(y.get("weight", math.nan)), rel_tol=1e-9):
            diffs.append(f"{where}.weight: {x.get('weight')!r} -> {y.get('weight')!r}")
        if x.get("split") != y.get("split"):
            diffs.append(f"{where}.split: {x.get('split')!r} -> {y.get('split')!r}")
    return diffs


def check_data_identity(meta: dict[str, Any], current: dict[str, Any], allow_change: bool, where: str) -> None:
    """Raise DataChangedError if this run's data would not continue the checkpoint's sample order.

    With `allow_change` the differences are logged as a warning instead, and training continues from the
    checkpoint's consumed-sample count in the new order. A checkpoint without the record (written before it
    existed) resumes with a warning.
    """
    saved = meta.get(META_KEY)
    if saved is None:
        log.warning("%s records no data identity (an older checkpoint): cannot check that the data is unchanged", where)
        return
    diffs = differences(saved, current)
    if not diffs:
        return
    consumed = meta.get("consumed_samples")
    if allow_change:
        log.warning("%s: data changed (%s=true), continuing from sample %s in the new order: %s",
                    where, ALLOW_FLAG, consumed, "; ".join(diffs))  # fmt: skip
        return
    raise DataChangedError(
        f"{where}: the checkpoint was trained on other data, so resuming would not continue its sample order: "
        f"{'; '.join(diffs)}. Set {ALLOW_FLAG}=true to continue from sample {consumed} with this data anyway"
    )
