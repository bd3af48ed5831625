"""Experiment tracking: the one metrics sink of a training run (`Tracker`: MLflow, metrics.jsonl, the log line),
the MLflow store (store.py), plots (plots.py). `python -m fm_pretrain.tracking init` creates a store.

Submodules: store.py (URIs, creating the store, git state), mlflow_run.py (one MLflow run through an explicit
client), jsonl.py (metrics.jsonl and its resume trimming), plots.py (loss curves), tracker.py (the sink).
"""

from fm_pretrain.config import flatten

from .jsonl import METRICS_FILE
from .mlflow_run import MAX_METRICS_PER_BATCH, RUN_ID_FILE
from .store import default_tracking_uri, ensure_store, git_info, resolve_tracking_uri
from .tracker import Tracker

__all__ = [
    "MAX_METRICS_PER_BATCH",
    "METRICS_FILE",
    "RUN_ID_FILE",
    "Tracker",
    "default_tracking_uri",
    "ensure_store",
    "flatten",
    "git_info",
    "resolve_tracking_uri",
]
