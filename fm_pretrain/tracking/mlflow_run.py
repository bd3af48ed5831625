"""One MLflow run, through an explicit `MlflowClient` (never the fluent `mlflow.start_run` globals, so nothing
depends on process-wide active-run state and several runs can coexist in one process).

A run's id is kept in `run_dir/mlflow_run_id`, so a resumed training continues the same MLflow run. The
`Tracker` (tracker.py) owns the one instance of this class on rank 0; nothing else calls it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from fm_pretrain.config import ModelConfig, TrackingConfig, flatten

from .store import ensure_store, git_info, resolve_tracking_uri

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
CONFIG_ARTIFACT = "config.yaml"
# MLflow limits (mlflow.utils.validation); truncating ourselves keeps behaviour independent of
# MLFLOW_TRUNCATE_LONG_VALUES. The full config is logged as an artifact anyway.
MAX_PARAM_VALUE_LEN = 6000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_PARAM_VALUE_LEN]


def model_type_of(config: dict) -> str:
    pattern = (config.get("model") or {}).get("layer_pattern")
    if not pattern:
        return "unknown"
    return ModelConfig(layer_pattern=list(pattern)).model_type  # same naming rule as the config


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class MlflowRun:
    """The MLflow side of a training run: create or reopen, params/tags/metrics/artifacts, end."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.tracking_uri = resolve_tracking_uri(cfg, run_dir)
        self.run_id: str | None = None
        self.resumed = False
        self._client: Any = None
        self._failures = 0
        self._system_monitor: Any = None

    @property
    def run_id_file(self) -> Path:
        return self.run_dir / RUN_ID_FILE

    def start(self, config: dict, tags: dict[str, str], params: dict[str, Any], resume: bool) -> None:
        """Create (or, with `resume` and an existing run id file, reopen) the run; log config, params and tags.

        MLflow errors propagate: a misconfigured store should stop the job before hours of untracked work.
        """
        from mlflow import MlflowClient

        self.run_dir.mkdir(parents=True, exist_ok=True)
        experiment_id = ensure_store(self.tracking_uri, self.cfg.experiment)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        run_id = self._reopen() if resume else None
        all_tags = {
            "model_type": model_type_of(config),
            "size": self.cfg.size or "unknown",
            "kind": "training",
            **git_info(),
            "run_dir": str(self.run_dir.resolve()),
        }
        if all_tags["git_commit"] != "unknown":
            all_tags["mlflow.source.git.commit"] = all_tags["git_commit"]  # shown by the MLflow UI
        all_tags.update({k: str(v) for k, v in tags.items()})
        if run_id is None:
            run_name = self.cfg.run_name or self.run_dir.resolve().name
            run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            tmp = self.run_id_file.with_suffix(".tmp")
            tmp.write_text(run_id + "\n")
            tmp.replace(self.run_id_file)  # atomic: a crash never leaves a half-written id
            logger.info("MLflow run %s (%s) at %s", run_id, run_name, self.tracking_uri)
        else:
            self.resumed = True
            prev = self._client.get_run(run_id).data.tags.get("resume_count", "0")
            all_tags["resume_count"] = str(int(prev) + 1 if prev.isdigit() else 1)
            self._client.update_run(run_id, status="RUNNING")
            logger.info("Reopened MLflow run %s at %s", run_id, self.tracking_uri)
        self.run_id = run_id
        self._log_params({**flatten(config), **params}, all_tags.get("resume_count"))
        self._log_tags(all_tags)
        self._client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), CONFIG_ARTIFACT)
        if self.cfg.system_metrics:
            self._start_system_metrics()

    def _reopen(self) -> str | None:
        """Run id from an earlier start in this run_dir, if that run still exists in this store."""
        from mlflow.exceptions import MlflowException

        if not self.run_id_file.is_file():
            return None
        run_id = self.run_id_file.read_text().strip()
        if not run_id:
            return None
        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            where = (run_id, self.run_id_file, self.tracking_uri)
            logger.warning("MLflow run %s from %s not in %s; starting a new run", *where)
            return None
        if run.info.lifecycle_stage == "deleted":
            logger.warning("MLflow run %s was deleted; starting a new run", run_id)
            return None
        return run_id

    def _log_params(self, flat: dict[str, Any], resume_count: str | None) -> None:
        from mlflow.entities import Param

        params = {k: _param_value(v) for k, v in flat.items()}
        # MLflow refuses to change a logged param; on resume log only new keys and record changed ones.
        existing = self._client.get_run(self.run_id).data.params if self.resumed else {}
        changed = {k: {"logged": existing[k], "now": v} for k, v in params.items() if existing.get(k, v) != v}
        fresh = [Param(k, v) for k, v in params.items() if k not in existing]
        for batch in _chunks(fresh, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=batch)
        if changed:
            logger.warning("Resumed run: config changed for %s (params keep first values)", sorted(changed))
            name = f"resume/{resume_count}_changed_params.yaml"
            self._client.log_text(self.run_id, yaml.safe_dump(changed), name)

    def _log_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=batch)

    def _start_system_metrics(self) -> None:
        """MLflow's own CPU / memory / disk / network (and GPU, with pynvml) sampler, as `system/*` metrics."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.cfg.system_metrics_interval_s,
                resume_logging=self.resumed,
                tracking_uri=self.tracking_uri,
            )
            self._system_monitor.start()
        except Exception as e:  # monitoring must never stop a training run
            logger.warning("MLflow system metrics not started: %s", e)
            self._system_monitor = None

    def history(self, key: str) -> list[tuple[int, float]]:
        """[(step, value)] of a metric in logging order (a later re-log of a step comes later)."""
        points = sorted(self._client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp)
        return [(m.step, m.value) for m in points]

    def _warn_failure(self, what: str, e: Exception) -> None:
        # Tracking hiccups (a busy sqlite file, a flaky server) must not kill a long training run;
        # warn on the first failure and then every 100th to keep logs readable.
        self._failures += 1
        if self._failures == 1 or self._failures % 100 == 0:
            logger.warning("MLflow %s failed (%d failures so far): %s", what, self._failures, e)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        try:
            for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk)
        except Exception as e:
            self._warn_failure("log_metrics", e)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        try:
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:
            self._warn_failure(f"log_artifact({path})", e)

    def log_text(self, text: str, name: str) -> None:
        try:
            self._client.log_text(self.run_id, text, name)
        except Exception as e:
            self._warn_failure(f"log_text({name})", e)

    def end(self, status: str) -> None:
        if self._system_monitor is not None:
            try:
                self._system_monitor.finish()
            except Exception as e:
                logger.warning("MLflow system metrics did not stop cleanly: %s", e)
            self._system_monitor = None
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:
            logger.warning("could not mark MLflow run %s %s: %s", self.run_id, status, e)
