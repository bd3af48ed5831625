"""A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact root) started by the test: runs logged to it
over HTTP are compared over HTTP (the MLflow client path) and from its sqlite file (the SQL path), with equal tables."""

from pathlib import Path

import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from fm_pretrain.compare.cli import CompareOptions, run_compare
from fm_pretrain.compare.report import read_csv, render_csv
from fm_pretrain.launch import launch_local
from tests.compare.handmade import EXPECTED, MATCHED_TOKENS, TINY_TRAINING, log_handmade
from tests.compare.jsonl_check import check_row_against_jsonl
from tests.helpers.mlflow_server import MlflowServer
from tests.helpers.paths import REPO
from tests.helpers.train_runs import data_overrides


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as s:
        yield s


def compare(store: str, experiment: str, out: Path, mlflow: bool = False):
    opts = CompareOptions(stores=[store], experiments=[experiment], out=str(out), mlflow=mlflow, progress=False)
    return run_compare(opts)


def test_http_and_sqlite_file_give_equal_tables(server, tmp_path):
    ids = log_handmade(server.uri, "handmade-http")
    from_file = compare(str(server.db), "handmade-http", tmp_path / "file")
    over_http = compare(server.uri, "handmade-http", tmp_path / "http", mlflow=True)  # logs the comparison run
    assert render_csv(over_http.table) == render_csv(from_file.table)
    assert over_http.table.matched_tokens == MATCHED_TOKENS
    rows = {r["run"]: r for r in over_http.table.rows}
    for name, expected in EXPECTED.items():
        assert rows[name]["run_id"] == ids[name]
        for key, value in expected.items():
            assert rows[name][key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)

    # the report, read back over HTTP as artifacts of the comparison run
    client = MlflowClient(server.uri)
    run = client.get_run(over_http.run_id)
    assert run.data.tags["kind"] == "comparison"
    assert {a.path for a in client.list_artifacts(over_http.run_id, "plots")} == {
        f"plots/{p.name}" for p in over_http.plots.values()
    }
    local = Path(client.download_artifacts(over_http.run_id, "", str(tmp_path / "dl")))
    assert read_csv((local / "table.csv").read_text()) == read_csv((tmp_path / "http" / "table.csv").read_text())
    for png in (local / "plots").glob("*.png"):
        assert imread(png).ndim == 3


@pytest.mark.slow
def test_two_trainings_logged_over_http_compare_alike_and_match_their_metrics_jsonl(
    server, packed, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # the trainer logs to the server over HTTP
    run_dirs = {}
    for kind in ("fm", "attention"):
        run_dir = tmp_path / kind
        log = tmp_path / f"{kind}.log"
        overrides = [*data_overrides(packed), *TINY_TRAINING, "tracking.experiment=http-train"]
        overrides.append(f"train.run_dir={run_dir}")
        result = launch_local(REPO / "configs" / f"tiny_{kind}.yaml", overrides, nproc=2, log_file=log, timeout=600)
        assert result.returncode == 0, f"training failed ({result.returncode}):\n{log.read_text()[-4000:]}"
        run_dirs[kind] = run_dir
    over_http = compare(server.uri, "http-train", tmp_path / "http")
    from_file = compare(str(server.db), "http-train", tmp_path / "file")
    assert render_csv(over_http.table) == render_csv(from_file.table)
    rows = {r["run"]: r for r in over_http.table.rows}
    assert set(rows) == set(run_dirs)  # run names default to the run dir's name
    for kind, run_dir in run_dirs.items():
        assert rows[kind]["model_type"] == kind and rows[kind]["status"] == "FINISHED"
        check_row_against_jsonl(rows[kind], run_dir, seq_len=64)
