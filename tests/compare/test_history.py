"""The fast sqlite reader against MLflow's own `get_metric_history` on the same store."""

import math

import numpy as np

from fm_pretrain.compare import names
from fm_pretrain.compare.history import read_client, read_sqlite, router_layer_keys
from fm_pretrain.compare.select import resolve_stores, select_runs


def test_one_query_equals_the_client_loop(handmade_db):
    db, ids = handmade_db
    store = resolve_stores([str(db)])[0]
    runs = select_runs([store]).runs
    fast = read_sqlite(store, runs)
    slow = read_client(store, runs)  # the http fallback, here through the same sqlite store
    assert fast.keys() == slow.keys() == set(ids.values())
    for rid in fast:
        assert fast[rid].keys() == slow[rid].keys(), rid
        for key in fast[rid]:
            a, b = fast[rid][key], slow[rid][key]
            np.testing.assert_array_equal(a.steps, b.steps)
            np.testing.assert_array_equal(a.times_ms, b.times_ms)
            np.testing.assert_array_equal(a.values, b.values)  # bit-exact (NaN equal to NaN)


def test_replayed_steps_keep_the_last_value_and_nans_are_kept_as_nan(handmade_db):
    db, ids = handmade_db
    store = resolve_stores([str(db)])[0]
    hist = read_sqlite(store, select_runs([store]).runs)
    val = hist[ids["fm-a"]][names.VAL_LOSS]
    assert val.steps.tolist() == [0, 5, 10] and val.values.tolist() == [10.0, 6.0, 4.0]
    b = hist[ids["attn-b"]][names.VAL_LOSS]
    assert b.steps.tolist() == [0, 2, 3, 5] and np.isnan(b.values[2]) and len(b.finite()) == 3


def test_router_layers_are_averaged_per_step(handmade_db):
    db, ids = handmade_db
    store = resolve_stores([str(db)])[0]
    hist = read_sqlite(store, select_runs([store]).runs)[ids["fm-a"]]
    ent = hist[f"{names.ROUTER_MEAN_PREFIX}/entropy"]
    assert ent.steps.tolist() == [5, 10] and ent.values.tolist() == [2.5, 1.5]
    assert hist[f"{names.ROUTER_MEAN_PREFIX}/dead_rows"].values.tolist() == [1.0, 2.0]
    keys = router_layer_keys(["router/layer0/entropy", "router/layerx/entropy", "router/layer2/other", "val/loss"])
    assert keys == {"router/layer0/entropy": "entropy"}


def test_router_names_match_the_model(handmade_db):
    from fm_pretrain.model import router_stats

    assert names.ROUTER_STATS == router_stats.ROUTER_STATS
    assert router_stats.metric_key(3, "entropy").startswith(f"{names.ROUTER_PREFIX}/layer3/")


def test_inf_nan_and_full_precision_read_back_exactly(tmp_path):
    """MLflow stores NaN as 0 with a flag and inf as DBL_MAX; values need all 17 digits to come back exactly."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    values = [0.1, 1 / 3, math.inf, -math.inf, math.nan, 2.0**-1070, 1e300, -0.0, 123456789.123456789]
    client.log_batch(run.info.run_id, metrics=[Metric("train/loss", v, 1000 + i, i) for i, v in enumerate(values)])
    store = resolve_stores([uri])[0]
    runs = select_runs([store]).runs
    for hist in (read_sqlite(store, runs), read_client(store, runs)):
        got = hist[run.info.run_id][names.TRAIN_LOSS].values
        np.testing.assert_array_equal(got, np.array(values))


def test_router_statistics_are_read_at_a_stride_of_long_runs(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from fm_pretrain.compare.history import ROUTER_POINTS

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    steps = range(1, 2 * ROUTER_POINTS + 501)  # largest step 4500: every 2nd step
    pts = [Metric(f"router/layer{i}/entropy", float(s + i), s, s) for s in steps for i in (0, 1)]
    for j in range(0, len(pts), 1000):
        client.log_batch(run.info.run_id, metrics=pts[j : j + 1000])
    store = resolve_stores([uri])[0]
    runs = select_runs([store]).runs
    fast = read_sqlite(store, runs)[run.info.run_id][f"{names.ROUTER_MEAN_PREFIX}/entropy"]
    assert fast.steps.tolist() == list(range(2, 4501, 2))
    np.testing.assert_array_equal(fast.values, fast.steps + 0.5)  # mean of layer 0 (s) and layer 1 (s + 1)
    full = read_client(store, runs)[run.info.run_id][f"{names.ROUTER_MEAN_PREFIX}/entropy"]
    assert len(full) == 4500 and full.values[1] == fast.values[0]
