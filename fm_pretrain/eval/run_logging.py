"""Logging an offline evaluation (long-context loss, retrieval) into a run's MLflow store, as the downstream one does.

The run is the training run named by `RUN_DIR/mlflow_run_id` when it exists (reopened by id with a plain client:
its status, params and tags are left alone, so this is safe while training goes on), else a new run
`<kind>-<run dir name>` of the run's experiment. The store is the run's own (`MLFLOW_TRACKING_URI` >
`tracking.tracking_uri` > `RUN_DIR/mlflow.db`). Metrics are logged at the checkpoint's step; files go under
`<artifact_dir>/`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from fm_pretrain.config import TrackingConfig
from fm_pretrain.tracking import MAX_METRICS_PER_BATCH, RUN_ID_FILE, ensure_store, resolve_tracking_uri

log = logging.getLogger(__name__)


def log_offline_eval(
    run_dir: Path,
    tracking: TrackingConfig,
    step: int,
    metrics: dict[str, float],
    files: Sequence[Path],
    artifact_dir: str,
    kind: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Log `metrics` at `step` and `files` under `artifact_dir` into the run's MLflow store; returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = resolve_tracking_uri(tracking, run_dir)
    experiment_id = ensure_store(uri, tracking.experiment)
    client = MlflowClient(tracking_uri=uri)
    id_file = Path(run_dir) / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    new_run = not run_id
    if new_run:
        run_id = client.create_run(experiment_id, run_name=f"{kind}-{Path(run_dir).resolve().name}", tags=tags or {})
        run_id = run_id.info.run_id
    else:
        client.get_run(run_id)  # fails loudly (naming the id) if the file points at a run this store lacks
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])
    for f in files:
        client.log_artifact(run_id, str(f), artifact_dir)
    if new_run:
        client.set_terminated(run_id)
    log.info("logged %d %s metrics at step %d to MLflow run %s (%s)", len(batch), kind, step, run_id, uri)
    return run_id
