"""Selecting runs: stores found under a directory tree, experiments, run ids, filter strings, and bad input."""

import shutil

import pytest
from mlflow import MlflowClient

from fm_pretrain.compare.cli import CompareOptions, main, run_compare
from fm_pretrain.compare.select import CompareError, Store, find_sqlite_stores, resolve_stores, select_runs
from tests.compare.handmade import EXPERIMENT


def test_unknown_experiment_lists_the_existing_ones(handmade_db):
    db, _ = handmade_db
    with pytest.raises(CompareError) as e:
        select_runs(resolve_stores([str(db)]), experiments=["no-such-exp"])
    msg = str(e.value)
    assert "unknown experiment 'no-such-exp'" in msg and EXPERIMENT in msg and str(db) in msg


def test_unknown_run_id_lists_the_runs_that_exist(handmade_db):
    db, ids = handmade_db
    with pytest.raises(CompareError) as e:
        select_runs(resolve_stores([str(db)]), run_ids=["0123456789abcdef0123456789abcdef"])
    msg = str(e.value)
    assert "run id '0123456789abcdef0123456789abcdef' not found" in msg
    assert all(f"{rid} ({name})" in msg for name, rid in ids.items())


def test_bad_filter_and_bad_options_name_the_option(handmade_db, tmp_path):
    db, _ = handmade_db
    with pytest.raises(CompareError, match="--filter"):
        select_runs(resolve_stores([str(db)]), filter_string="params.x ==== 'y'")
    for kw, option in (({"smoothing": 1.5}, "--smoothing"), ({"sort": "nope"}, "--sort")):
        with pytest.raises(CompareError, match=option):
            run_compare(CompareOptions(stores=[str(db)], out=str(tmp_path / "o"), mlflow=False, **kw))


def test_bad_stores_are_named(tmp_path):
    with pytest.raises(CompareError, match="not found"):
        resolve_stores([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match="no mlflow.db file anywhere below"):
        resolve_stores([str(tmp_path / "empty")])
    with pytest.raises(CompareError, match="no such sqlite file"):
        resolve_stores([f"sqlite:///{tmp_path / 'nope.db'}"])
    with pytest.raises(CompareError, match="no store given"):
        resolve_stores([])


def test_cli_exits_2_with_a_clear_message(handmade_db, tmp_path, capsys):
    db, _ = handmade_db
    assert main(["--store", str(db), "--experiment", "nope", "--no-mlflow", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown experiment 'nope'") and "Traceback" not in err


def test_filters_run_ids_and_experiments(handmade_db):
    db, ids = handmade_db
    stores = resolve_stores([str(db)])
    by_tag = select_runs(stores, filter_string="tags.model_type = 'fm'").runs
    assert [r.name for r in by_tag] == ["fm-a"]
    by_param = select_runs(stores, experiments=[EXPERIMENT], filter_string="params.`model.fm.top_k` = '4'").runs
    assert sorted(r.name for r in by_param) == ["attn-b", "fm-a"]
    by_id = select_runs(stores, run_ids=[ids["mamba-c"], ids["attn-b"]]).runs
    assert sorted(r.name for r in by_id) == ["attn-b", "mamba-c"]
    with pytest.raises(CompareError, match="no runs selected"):
        select_runs(stores, filter_string="tags.model_type = 'nothing'")


def test_a_directory_tree_of_per_run_stores(handmade_db, tmp_path):
    """Training writes one mlflow.db per run dir: all of them are found (checkpoints/ is not searched)."""
    db, ids = handmade_db
    for name in ("a", "b/nested"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(db, tmp_path / "runs" / name / "mlflow.db")
    (tmp_path / "runs" / "a" / "checkpoints").mkdir()
    shutil.copy(db, tmp_path / "runs" / "a" / "checkpoints" / "mlflow.db")
    found = find_sqlite_stores(tmp_path / "runs")
    assert found == [tmp_path / "runs" / "a" / "mlflow.db", tmp_path / "runs" / "b" / "nested" / "mlflow.db"]
    stores = resolve_stores([str(tmp_path / "runs"), str(tmp_path / "runs" / "a" / "mlflow.db")])
    assert len(stores) == 2 and all(s.kind == "sqlite" for s in stores)
    sel = select_runs(stores)  # the copies hold the same run ids: each taken once, from the first store
    assert sorted(r.run_id for r in sel.runs) == sorted(ids.values())
    assert all(r.store == stores[0] for r in sel.runs) and len(sel.notes) == 3


def test_store_kinds():
    assert Store("http://127.0.0.1:5000").kind == "http"
    assert Store("sqlite:////tmp/x/mlflow.db").sqlite_path.as_posix() == "/tmp/x/mlflow.db"
    assert Store("file:///tmp/mlruns").kind == "other"


def test_deleted_runs_are_not_selected(tmp_path):
    from tests.compare.handmade import log_handmade

    db = tmp_path / "mlflow.db"
    ids = log_handmade(f"sqlite:///{db}")
    MlflowClient(f"sqlite:///{db}").delete_run(ids["attn-b"])
    names = sorted(r.name for r in select_runs(resolve_stores([str(db)])).runs)
    assert names == ["fm-a", "mamba-c"]
    with pytest.raises(CompareError, match="not found"):
        select_runs(resolve_stores([str(db)]), run_ids=[ids["attn-b"]])
