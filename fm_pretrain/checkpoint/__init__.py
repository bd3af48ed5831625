"""Checkpoints: the on-disk format (format.py), atomic saves (save.py), resume and loading (load.py, rng.py),
resharding to another parallel layout (reshard.py), full weights and the model for evaluation (export.py), and
the offline CLI `python -m fm_pretrain.checkpoint {info,universal,export} STEP_DIR` (__main__.py).

Dependencies: checkpoint -> config, data (identity), model, parallel, testing.faults; nothing in model/, data/ or
parallel/ imports checkpoint.
"""

from .export import full_weights, load_model, load_weights
from .format import (
    FORMAT,
    META_FILE,
    TMP_SUFFIX,
    UNIVERSAL_DIR,
    CheckpointLayout,
    complete_tags,
    latest_tag,
    prune,
    read_meta,
    resolve_step_dir,
    step_tag,
    write_latest,
)
from .load import find_resume, load_checkpoint
from .reshard import is_universal, load_resharded, merge_shards, to_tp_ranks, to_universal
from .rng import rng_state, set_rng_state
from .save import save_checkpoint

__all__ = [
    "FORMAT",
    "META_FILE",
    "TMP_SUFFIX",
    "UNIVERSAL_DIR",
    "CheckpointLayout",
    "complete_tags",
    "find_resume",
    "full_weights",
    "is_universal",
    "latest_tag",
    "load_checkpoint",
    "load_model",
    "load_resharded",
    "load_weights",
    "merge_shards",
    "prune",
    "read_meta",
    "resolve_step_dir",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "step_tag",
    "to_tp_ranks",
    "to_universal",
    "write_latest",
]
