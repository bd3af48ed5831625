"""The one metrics sink of a training run: `Tracker.log_metrics(metrics, step)` reaches every backend.

Backends, all on rank 0 only (the tracker checks the rank itself, callers never do):
- MLflow (`tracking.enabled`): the run in the store, params, tags, metrics, artifacts, the loss plot at the end,
  MLflow's system metrics (`tracking.system_metrics`);
- `run_dir/metrics.jsonl`: one JSON line per logged call, readable without MLflow; on resume the tracker trims
  it to the checkpoint's step (jsonl.py), so it stays one clean history;
- the log line: a short human summary of the known keys (loss, lr, tokens/s, MFU, validation loss).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from fm_pretrain.config import TrackingConfig

from .jsonl import METRICS_FILE, append_metrics, truncate_metrics
from .mlflow_run import MlflowRun
from .plots import LOSS_KEYS, LR_KEYS, plot_loss

logger = logging.getLogger(__name__)
console = logging.getLogger("fm_pretrain.train")  # the training log's own logger: the line people read

PLOT_ARTIFACT_DIR = "plots"


def format_line(metrics: dict[str, float], step: int, total_steps: int | None) -> str | None:
    """'step 10/200  loss 5.1234  lr 3.00e-04  1234 tok/s  MFU 1.2%' from the keys present; None when none is."""
    where = f"step {step}/{total_steps}" if total_steps else f"step {step}"
    parts = []
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if "train/lr" in metrics:
        parts.append(f"lr {metrics['train/lr']:.2e}")
    if "perf/tokens_per_s" in metrics:
        parts.append(f"{metrics['perf/tokens_per_s']:.0f} tok/s")
    if "perf/mfu" in metrics:
        parts.append(f"MFU {metrics['perf/mfu']:.1%}")
    if "train/skipped_steps" in metrics and metrics["train/skipped_steps"]:
        parts.append(f"{metrics['train/skipped_steps']:.0f} skipped")
    if "val/loss" in metrics:
        parts.append(f"validation loss {metrics['val/loss']:.4f}")
    return "  ".join([where, *parts]) if parts else None


class Tracker:
    """Rank 0 tracks; every method is a no-op on the other ranks (and the MLflow part when disabled)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: str | os.PathLike,
        rank: int,
        *,
        total_steps: int | None = None,
        metrics_file: bool = False,
        log_lines: bool = False,
    ):
        """`metrics_file` and `log_lines` switch on the run directory's metrics.jsonl and the log line (the
        trainer's sink has all three backends; a bare Tracker only the MLflow run)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.total_steps = total_steps
        self.log_lines = log_lines
        self.metrics_path = self.run_dir / METRICS_FILE if (rank == 0 and metrics_file) else None
        self._mlflow = MlflowRun(cfg, self.run_dir) if (rank == 0 and cfg.enabled) else None
        # In-memory history {key: [(step, value)]} of the plotted keys; on resume seeded from MLflow so the
        # final curves cover the whole run.
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._finished = False

    @property
    def run_id(self) -> str | None:
        return self._mlflow.run_id if self._mlflow else None

    @property
    def tracking_uri(self) -> str | None:
        return self._mlflow.tracking_uri if self._mlflow else None

    @property
    def resumed(self) -> bool:
        return bool(self._mlflow and self._mlflow.resumed)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(
        self,
        config: dict,
        tags: dict[str, str] | None = None,
        *,
        params: dict[str, Any] | None = None,
        resume: bool = True,
        resume_step: int | None = None,
    ) -> None:
        """Open the run. `params` are logged beside the flattened config (e.g. n_params); `resume_step`, the
        step of the checkpoint this process resumed from, trims metrics.jsonl: later steps are replayed."""
        if self.rank != 0:
            return
        if self.metrics_path is not None and resume_step is not None:
            truncate_metrics(self.metrics_path, resume_step)
        if self._mlflow is None:
            return
        if self._mlflow.run_id is not None:
            logger.warning("Tracker.start called twice; keeping run %s", self._mlflow.run_id)
            return
        self._mlflow.start(config, tags or {}, params or {}, resume)
        if self._mlflow.resumed:
            for key in (*LOSS_KEYS, *LR_KEYS):
                try:
                    points = self._mlflow.history(key)
                except Exception as e:  # only the final plot depends on it
                    logger.warning("could not read metric history of %s: %s", key, e)
                    continue
                if points:
                    self.history[key] = points + self.history.get(key, [])

    def finish(self, status: str = "FINISHED") -> None:
        """Log the loss plot and end the MLflow run (status: FINISHED, FAILED or KILLED)."""
        if self._mlflow is None or self._mlflow.run_id is None or self._finished:
            return
        self._finished = True
        try:
            self._log_loss_plot()
        except Exception as e:  # a plotting problem must never fail a finished training
            logger.warning("loss plot failed: %s", e)
        self._mlflow.end(status)

    def _log_loss_plot(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            title = self.cfg.run_name or self.run_dir.resolve().name
            if plot_loss(self.history, title, Path(tmp) / "loss.png") is not None:
                self._mlflow.log_artifact(Path(tmp) / "loss.png", PLOT_ARTIFACT_DIR)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- logging --------------------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalar metrics (keys like 'train/loss', 'perf/tokens_per_s') at a training step, everywhere.

        Values may be floats, numpy scalars or 0-d tensors (converted here, i.e. on rank 0 at log time).
        """
        if self.rank != 0:
            return
        values = {k: float(v) for k, v in metrics.items()}
        if self.metrics_path is not None:
            append_metrics(self.metrics_path, step, values)
        line = format_line(values, step, self.total_steps) if self.log_lines else None
        if line is not None:
            console.info(line)
        if self._mlflow is None or self._mlflow.run_id is None:
            return
        for key, value in values.items():
            if key in LOSS_KEYS or key in LR_KEYS:
                self.history.setdefault(key, []).append((step, value))
        self._mlflow.log_metrics(values, step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's contents) under `artifact_path` of the run."""
        if self._mlflow is not None and self._mlflow.run_id is not None:
            self._mlflow.log_artifact(path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        """Store `text` as the artifact file `name` (e.g. 'model_summary.txt')."""
        if self._mlflow is not None and self._mlflow.run_id is not None:
            self._mlflow.log_text(text, name)
