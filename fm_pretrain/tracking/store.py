"""Where runs are tracked: the MLflow store (URI precedence, creating a sqlite store and experiment) and the
git state recorded with each run.

The sqlite store must exist before ranks start: two processes creating a fresh sqlite database at once fail.
Call `ensure_store` (or `python -m fm_pretrain.tracking init`) from the launcher first.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from urllib.parse import unquote

from fm_pretrain.config import TrackingConfig

logger = logging.getLogger(__name__)

_REPO_DIR = Path(__file__).resolve().parents[2]


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
