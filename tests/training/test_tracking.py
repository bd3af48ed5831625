"""Tracking against a real MLflow sqlite store in tmp_path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fm_pretrain import tracking
from fm_pretrain.config import TrackingConfig, from_dict, to_dict
from fm_pretrain.tracking import Tracker, default_tracking_uri, ensure_store
from tests.helpers.paths import REPO  # noqa: E402


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(run_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=default_tracking_uri(run_dir))


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_default_tracking_uri(tmp_path, monkeypatch):
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_ensure_store_is_idempotent(tmp_path):
    uri = default_tracking_uri(tmp_path / "run")
    first = ensure_store(uri, "exp-a")
    assert (tmp_path / "run" / "mlflow.db").is_file()
    assert ensure_store(uri, "exp-a") == first
    assert ensure_store(uri, "exp-b") != first
    exp = _client(tmp_path / "run").get_experiment(first)
    # artifacts live beside the database, not in ./mlruns of whatever cwd
    assert exp.artifact_location == (tmp_path / "run" / "mlartifacts").resolve().as_uri()


def test_tracker_logs_params_metrics_tags_artifacts_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cfg = from_dict({})
    config = to_dict(cfg)
    track_cfg = TrackingConfig(experiment="unit", run_name="unit-run", size="tiny")
    ensure_store(default_tracking_uri(run_dir), track_cfg.experiment)  # as the launcher does

    tr = Tracker(track_cfg, run_dir, rank=0)
    tr.start(config, tags={"purpose": "test"})
    assert tr.run_id and (run_dir / tracking.RUN_ID_FILE).read_text().strip() == tr.run_id
    for step in range(5):
        tr.log_metrics({"train/loss": 5.0 - step, "train/lr": 1e-4 * (step + 1)}, step)
    tr.log_metrics({"val/loss": 3.5, "perf/tokens_per_s": 1234.0}, step=4)
    (tmp_path / "note.txt").write_text("hello")
    tr.log_artifact(tmp_path / "note.txt", "extra")
    tr.log_text("summary", "model_summary.txt")
    tr.finish()
    assert [s for s, _ in tr.history["train/loss"]] == list(range(5))

    client = _client(run_dir)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit-run"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    p = run.data.params
    assert p["model.d_model"] == str(cfg.model.d_model)
    assert p["model.fm.n_memories"] == str(cfg.model.fm.n_memories)
    assert p["optim.lr"] == str(cfg.optim.lr)
    assert p["model.layer_pattern"] == str(cfg.model.layer_pattern)
    assert p["model.fm.top_k"] == "None"
    assert len(p) == len(tracking.flatten(config))  # > 100 params needs several batches
    t = run.data.tags
    assert t["model_type"] == "fm"
    assert t["size"] == "tiny"
    assert t["purpose"] == "test"
    assert t["git_commit"]  # a sha or "unknown" (e.g. no commit yet)
    assert t["git_dirty"] in ("true", "false", "unknown")
    hist = client.get_metric_history(tr.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(s, 5.0 - s) for s in range(5)]
    assert client.get_metric_history(tr.run_id, "perf/tokens_per_s")[0].value == 1234.0
    arts = _artifact_paths(client, tr.run_id)
    assert {"config.yaml", "plots/loss.png", "extra/note.txt", "model_summary.txt"} <= arts
    png = Path(client.download_artifacts(tr.run_id, "plots/loss.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resume in the same run_dir: same run, params not re-logged (a changed value must not error).
    config["train"]["steps"] = 2 * cfg.train.steps
    tr2 = Tracker(track_cfg, run_dir, rank=0)
    tr2.start(config, tags={"purpose": "test"})
    assert tr2.run_id == tr.run_id and tr2.resumed
    assert client.get_run(tr.run_id).info.status == "RUNNING"
    assert [s for s, _ in tr2.history["train/loss"]] == list(range(5))  # seeded for the final plot
    tr2.log_metrics({"train/loss": 0.5}, step=5)
    tr2.finish()
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume_count"] == "1"
    assert run.data.params["train.steps"] == str(cfg.train.steps)  # first value kept
    assert "resume/1_changed_params.yaml" in _artifact_paths(client, tr.run_id)
    assert len(client.get_metric_history(tr.run_id, "train/loss")) == 6
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # resume=False (a fresh training in the same run_dir) opens a new run
    tr3 = Tracker(track_cfg, run_dir, rank=0)
    tr3.start(config, resume=False)
    assert tr3.run_id != tr.run_id
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == tr3.run_id
    tr3.finish("FAILED")
    assert client.get_run(tr3.run_id).info.status == "FAILED"


def test_nonzero_rank_and_disabled_write_nothing(tmp_path):
    config = to_dict(from_dict({}))
    for cfg, rank in ((TrackingConfig(), 1), (TrackingConfig(enabled=False), 0)):
        run_dir = tmp_path / f"r{rank}"
        tr = Tracker(cfg, run_dir, rank=rank)
        tr.start(config, tags={"a": "b"})
        tr.log_metrics({"train/loss": 1.0}, step=0)
        tr.log_artifact(__file__)
        tr.log_text("x", "x.txt")
        tr.finish()
        assert tr.run_id is None and tr.history == {}
        assert not run_dir.exists()


def test_plot_failure_does_not_crash_finish(tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    tr = Tracker(TrackingConfig(), run_dir, rank=0)
    tr.start({"model": {"layer_pattern": ["fm", "attention"]}})
    tr.log_metrics({"train/loss": 1.0}, step=0)

    def boom() -> None:
        raise RuntimeError("no display")

    monkeypatch.setattr(tr, "_log_loss_plot", boom)
    tr.finish()
    assert "loss plot failed" in caplog.text
    run = _client(run_dir).get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_type"] == "hybrid-attention+fm"


def test_start_raises_on_broken_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{blocker}/sub/mlflow.db")
    with pytest.raises(Exception):  # noqa: B017 - any store error must surface, not be swallowed
        Tracker(cfg, tmp_path / "run", rank=0).start({})


def test_cli_init(tmp_path):
    run_dir = tmp_path / "cli_run"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    cmd = [sys.executable, "-m", "fm_pretrain.tracking", "init", "--run-dir", str(run_dir), "--experiment", "cli"]
    for _ in range(2):  # safe to run twice
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert _client(run_dir).get_experiment_by_name("cli") is not None


def test_one_call_reaches_every_backend_and_resume_trims_the_metrics_file(tmp_path, caplog):
    """log_metrics writes MLflow, metrics.jsonl and the log line; a resumed start drops the replayed steps."""
    import json
    import logging

    run_dir = tmp_path / "run"
    tr = Tracker(
        TrackingConfig(system_metrics=False), run_dir, rank=0, total_steps=4, metrics_file=True, log_lines=True
    )
    tr.start({"model": {"layer_pattern": ["fm"]}}, params={"n_params": 123})
    with caplog.at_level(logging.INFO, logger="fm_pretrain.train"):
        for step in range(1, 5):
            tr.log_metrics({"train/loss": 5.0 - step, "perf/tokens_per_s": 100.0 * step}, step)
    tr.finish()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
    assert "step 3/4  loss 2.0000  300 tok/s" in caplog.text
    client = _client(run_dir)
    assert [m.value for m in client.get_metric_history(tr.run_id, "train/loss")] == [4.0, 3.0, 2.0, 1.0]
    run = client.get_run(tr.run_id)
    assert run.data.params["n_params"] == "123" and run.data.tags["kind"] == "training"
    # resumed from the checkpoint of step 2: steps 3 and 4 are about to be replayed, so they leave the file
    tr2 = Tracker(TrackingConfig(system_metrics=False), run_dir, rank=0, metrics_file=True)
    tr2.start({"model": {"layer_pattern": ["fm"]}}, resume_step=2)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    tr2.finish()
    # another rank: nothing at all
    other = Tracker(TrackingConfig(), tmp_path / "r1", rank=1, metrics_file=True, log_lines=True)
    other.start({})
    other.log_metrics({"train/loss": 1.0}, 1)
    assert not (tmp_path / "r1").exists()


def test_system_metrics_are_logged(tmp_path):
    """MLflow's own sampler (CPU, memory, disk, network) logs system/* metrics into the run while it is open."""
    import time

    run_dir = tmp_path / "run"
    tr = Tracker(TrackingConfig(system_metrics_interval_s=0.2), run_dir, rank=0)
    tr.start({})
    client = _client(run_dir)
    deadline = time.monotonic() + 60
    keys: set[str] = set()
    while time.monotonic() < deadline and "system/cpu_utilization_percentage" not in keys:
        keys = set(client.get_run(tr.run_id).data.metrics)
        time.sleep(0.2)  # polling interval, bounded by the deadline
    tr.finish()
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
