"""MLflow experiment tracking of training runs (evaluation adds to a run by id: fm_pretrain/eval/report.py).

Design notes:
- Uses an explicit `MlflowClient` (never the fluent `mlflow.start_run` globals), so nothing depends on
  process-wide active-run state and several Trackers can coexist in tests.
- Only rank 0 with tracking enabled does anything; other ranks never even import mlflow (slow import).
- The sqlite store must exist before ranks start: two processes creating a fresh sqlite database at once
  fail. Call `ensure_store` (or `python -m fm_pretrain.tracking init`) from the launcher first.
- A run's id is kept in `run_dir/mlflow_run_id`, so a resumed training continues the same MLflow run.

CLI:  python -m fm_pretrain.tracking init --run-dir DIR [--experiment NAME] [--tracking-uri URI]
      prints the tracking URI on stdout (MLflow's own log lines go to stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import yaml

from fm_pretrain.config import ModelConfig, TrackingConfig, flatten

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
CONFIG_ARTIFACT = "config.yaml"
PLOT_ARTIFACT_DIR = "plots"
LOSS_KEYS = ("train/loss", "val/loss")
LR_KEYS = ("train/lr", "lr", "optim/lr")  # first one present is plotted
# MLflow limits (mlflow.utils.validation); truncating ourselves keeps behaviour independent of
# MLFLOW_TRUNCATE_LONG_VALUES. The full config is logged as an artifact anyway.
MAX_PARAM_VALUE_LEN = 6000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_REPO_DIR = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# Store setup


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite database inside run_dir."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | os.PathLike) -> str:
    """Precedence: MLFLOW_TRACKING_URI env > tracking.tracking_uri > sqlite file in run_dir."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env or cfg.tracking_uri or default_tracking_uri(run_dir)


def _sqlite_path(uri: str) -> Path | None:
    """Database file of a `sqlite:///` URI (relative paths resolve against the cwd, as in MLflow)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(os.path.abspath(path))


def ensure_store(uri: str, experiment: str) -> str:
    """Create the tracking database (sqlite) and the experiment if missing; return the experiment id.

    Idempotent. For sqlite stores the experiment's artifacts go to `mlartifacts/` beside the database:
    MLflow's client-side default would be `./mlruns` relative to whatever the cwd happens to be.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    artifact_location = None
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent / "mlartifacts").as_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            return client.create_experiment(experiment, artifact_location=artifact_location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a creation race: fine
                raise
            exp = client.get_experiment_by_name(experiment)
            assert exp is not None
    if exp.lifecycle_stage == "deleted":
        # A deleted experiment still owns its name; creating a new one would fail.
        logger.warning("MLflow experiment '%s' was deleted; restoring it", experiment)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO_DIR), *args], capture_output=True, text=True, timeout=15, check=True
        )
    except (OSError, subprocess.SubprocessError):  # git missing, not a checkout, no commits yet, hung
        return None
    return out.stdout.strip()


def git_info() -> dict[str, str]:
    """{'git_commit', 'git_dirty'} of the fm-pretrain checkout; 'unknown' when it cannot be determined."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    status = _git("status", "--porcelain")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"git_commit": commit, "git_dirty": dirty}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_PARAM_VALUE_LEN]


def _model_type(config: dict) -> str:
    pattern = (config.get("model") or {}).get("layer_pattern")
    if not pattern:
        return "unknown"
    return ModelConfig(layer_pattern=list(pattern)).model_type  # same naming rule as the config


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _dedupe_by_step(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """Last value wins per step: a resumed run re-logs the steps after its last checkpoint."""
    by_step = dict(points)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# ----------------------------------------------------------------------------------------------------------
# Tracker


class Tracker:
    """Rank-0 MLflow run of one training run_dir. Every method is a no-op on other ranks or when disabled."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | os.PathLike, rank: int):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.active = bool(cfg.enabled) and rank == 0
        self.tracking_uri = resolve_tracking_uri(cfg, run_dir) if self.active else None
        # In-memory metric history {key: [(step, value), ...]}; on resume it is seeded from MLflow for the
        # plotted keys so the final curves cover the whole run.
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.resumed = False
        self._client: Any = None
        self._run_id: str | None = None
        self._finished = False
        self._log_failures = 0

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def run_id_file(self) -> Path:
        return self.run_dir / RUN_ID_FILE

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self, config: dict, tags: dict[str, str] | None = None, *, resume: bool = True) -> None:
        """Start (or, with `resume` and an existing run id file, reopen) the run; log config and tags.

        MLflow errors propagate: a misconfigured store should stop the job before hours of untracked work.
        """
        if not self.active:
            return
        if self._run_id is not None:
            logger.warning("Tracker.start called twice; keeping run %s", self._run_id)
            return
        from mlflow import MlflowClient

        self.run_dir.mkdir(parents=True, exist_ok=True)
        experiment_id = ensure_store(self.tracking_uri, self.cfg.experiment)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        run_id = self._reopen() if resume else None
        all_tags = {
            "model_type": _model_type(config),
            "size": self.cfg.size or "unknown",
            **git_info(),
            "run_dir": str(self.run_dir.resolve()),
        }
        if all_tags["git_commit"] != "unknown":
            all_tags["mlflow.source.git.commit"] = all_tags["git_commit"]  # shown by the MLflow UI
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})

        if run_id is None:
            run_name = self.cfg.run_name or self.run_dir.resolve().name
            run = self._client.create_run(experiment_id, run_name=run_name)
            run_id = run.info.run_id
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
        self._run_id = run_id

        self._log_params(flatten(config), all_tags.get("resume_count"))
        self._log_tags(all_tags)
        self._client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), CONFIG_ARTIFACT)
        if self.resumed:
            self._load_plot_history()

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
        existing = self._client.get_run(self._run_id).data.params if self.resumed else {}
        changed = {k: {"logged": existing[k], "now": v} for k, v in params.items() if existing.get(k, v) != v}
        fresh = [Param(k, v) for k, v in params.items() if k not in existing]
        for batch in _chunks(fresh, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, params=batch)
        if changed:
            logger.warning("Resumed run: config changed for %s (params keep first values)", sorted(changed))
            name = f"resume/{resume_count}_changed_params.yaml"
            self._client.log_text(self._run_id, yaml.safe_dump(changed), name)

    def _log_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=batch)

    def _load_plot_history(self) -> None:
        for key in (*LOSS_KEYS, *LR_KEYS):
            try:
                points = self._client.get_metric_history(self._run_id, key)
            except Exception as e:  # only the final plot depends on it
                logger.warning("could not read metric history of %s: %s", key, e)
                continue
            points = sorted(points, key=lambda m: m.timestamp)  # logging order; later re-logs win
            if points:
                self.history[key] = [(m.step, m.value) for m in points] + self.history.get(key, [])

    def finish(self, status: str = "FINISHED") -> None:
        """Log the loss-curve plot and end the run (status: FINISHED, FAILED or KILLED)."""
        if not self.active or self._run_id is None or self._finished:
            return
        self._finished = True
        try:
            self._log_loss_plot()
        except Exception as e:  # a plotting problem must never fail a finished training
            logger.warning("loss plot failed: %s", e)
        try:
            self._client.set_terminated(self._run_id, status=status)
        except Exception as e:
            logger.warning("could not mark MLflow run %s %s: %s", self._run_id, status, e)

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

    def _warn_failure(self, what: str, e: Exception) -> None:
        # Tracking hiccups (a busy sqlite file, a flaky server) must not kill a long training run;
        # warn on the first failure and then every 100th to keep logs readable.
        self._log_failures += 1
        if self._log_failures == 1 or self._log_failures % 100 == 0:
            logger.warning("MLflow %s failed (%d failures so far): %s", what, self._log_failures, e)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics (keys like 'train/loss', 'perf/tokens_per_s') at a training step."""
        if not self.active or self._run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            value = float(value)  # accepts 0-d tensors and numpy scalars
            self.history.setdefault(key, []).append((step, value))
            batch.append(Metric(key, value, now, step))
        try:
            for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=chunk)
        except Exception as e:
            self._warn_failure("log_metrics", e)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's contents) under `artifact_path` of the run."""
        if not self.active or self._run_id is None:
            return
        try:
            if Path(path).is_dir():
                self._client.log_artifacts(self._run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self._run_id, str(path), artifact_path)
        except Exception as e:
            self._warn_failure(f"log_artifact({path})", e)

    def log_text(self, text: str, name: str) -> None:
        """Store `text` as the artifact file `name` (e.g. 'model_summary.txt')."""
        if not self.active or self._run_id is None:
            return
        try:
            self._client.log_text(self._run_id, text, name)
        except Exception as e:
            self._warn_failure(f"log_text({name})", e)

    # -- plots ----------------------------------------------------------------------------------------------

    def _log_loss_plot(self) -> None:
        loss_keys = [k for k in LOSS_KEYS if self.history.get(k)]
        lr_key = next((k for k in LR_KEYS if self.history.get(k)), None)
        if not loss_keys and lr_key is None:
            return
        # Figure + Agg canvas directly: no pyplot global state, no backend switch for the host process.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = int(bool(loss_keys)) + int(lr_key is not None)
        fig = Figure(figsize=(8, 3.2 * rows + 0.6))
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
        ax_iter = iter(axes)
        if loss_keys:
            ax = next(ax_iter)
            for key in loss_keys:
                steps, values = _dedupe_by_step(self.history[key])
                marker = "o" if key.startswith("val/") else None
                ax.plot(steps, values, label=key, marker=marker, markersize=3)
            ax.set_ylabel("loss")
            ax.legend()
            ax.grid(alpha=0.3)
        if lr_key is not None:
            ax = next(ax_iter)
            steps, values = _dedupe_by_step(self.history[lr_key])
            ax.plot(steps, values, color="tab:green", label=lr_key)
            ax.set_ylabel("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.suptitle(self.cfg.run_name or self.run_dir.resolve().name)
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "loss.png"
            fig.savefig(out, dpi=110)
            self._client.log_artifact(self._run_id, str(out), PLOT_ARTIFACT_DIR)


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm_pretrain.tracking", description="MLflow store setup")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the tracking store and experiment; print the tracking URI")
    init.add_argument("--run-dir", required=True)
    init.add_argument("--experiment", default=TrackingConfig.experiment)
    init.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or run_dir sqlite")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(args.run_dir)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    ensure_store(uri, args.experiment)
    print(uri, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
