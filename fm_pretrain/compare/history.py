"""Metric histories of the selected runs, read fast.

MLflow's client offers `get_metric_history(run_id, key)`: one call per run and key, each building a Python
object per point (through SQLAlchemy's ORM on a sqlite store). For 50 runs x 20,000 steps that loop is the
slow part of a comparison (bench/compare.py measures it: minutes). Here, per sqlite store, **one SQL query** on a
read-only connection to MLflow's `metrics` table fetches every history the comparison needs for all of the
store's selected runs at once. It returns one row per (run, metric) whose columns are the series packed as text
by `group_concat` (steps, timestamps, values written with 17 significant digits, so every double reads back
exactly), parsed by numpy in C: no Python object per point. Rows of one group reach all of its aggregates in the
same order, so the packed columns stay aligned; points are sorted afterwards.

What is read: the HISTORY_KEYS of names.py, in full (`train/consumed_samples` only when some run lacks
`train/tokens`), and the per-layer router statistics at every n-th step (n = the largest step / ROUTER_POINTS,
at least 1: the router plot thins its lines to about that many points anyway; the per-layer latest values come
from the runs' latest metrics), averaged over layers per step as `router/mean/<stat>`; and, for the runs that
have them, the offline evaluations' per-length metrics in full (`long_context/<lang>/loss_so_far/<L>`,
`retrieval/<task>/acc/<L>`: one point per evaluated checkpoint), so that table.py can take every length of one
evaluation, the latest.

Other stores (an `mlflow server` over http, anything else) fall back to the MLflow client, one call per run and
key, in a few threads, and give the same series. Cleaning is the same for both paths: a step logged twice (a
resumed run replays the steps after its last checkpoint) keeps its last value by timestamp, as the Tracker's own
plots do; MLflow stores NaN as 0 with a flag (read back as NaN) and +-inf as +-DBL_MAX (read back as +-inf).
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import names
from .select import CompareError, RunRecord, Store

RUNS_PER_QUERY = 400  # run ids bound per query (SQLite's bound-parameter limit is 32766)
FETCH_GROUPS = 64  # series per fetchmany: bounds the text held at once
ROUTER_POINTS = 2000  # about this many steps of the router statistics per run
CLIENT_THREADS = 8
# MLflow stores +-inf as +-DBL_MAX; SQLite 3.40 prints DBL_MAX one ulp low: both of the largest doubles read as inf.
INF_FROM = float(np.nextafter(sys.float_info.max, 0.0))


@dataclass
class Series:
    """One metric's history, one point per step (sorted): steps, values (NaN where NaN was logged), times in ms."""

    steps: np.ndarray
    values: np.ndarray
    times_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def finite(self) -> Series:
        """The points with a finite value."""
        ok = np.isfinite(self.values)
        return Series(self.steps[ok], self.values[ok], self.times_ms[ok])


History = dict[str, Series]  # metric key -> series


def router_layer_keys(metric_keys: Sequence[str]) -> dict[str, str]:
    """{per-layer router key: its statistic} among a run's metric keys (`router/layer<i>/<stat>`)."""
    out = {}
    for key in metric_keys:
        parts = key.split("/")
        if (len(parts) == 3 and parts[0] == names.ROUTER_PREFIX and parts[1].startswith("layer")
                and parts[1][5:].isdigit() and parts[2] in names.ROUTER_STATS):  # fmt: skip
            out[key] = parts[2]
    return out


def _length_keys(metric_keys: Sequence[str], prefix: str, metric: str, groups: Sequence[str] | None):
    out = {}
    for key in metric_keys:
        parts = key.split("/")
        if (len(parts) == 4 and parts[0] == prefix and parts[2] == metric and parts[3].isdigit()
                and parts[1] and (groups is None or parts[1] in groups)):  # fmt: skip
            out[key] = (parts[1], int(parts[3]))
    return out


def long_context_keys(metric_keys: Sequence[str]) -> dict[str, tuple[str, int]]:
    """{key: (lang, L)} of the long-context loss-so-far keys (`long_context/<lang>/loss_so_far/<L>`, lang en/ja)."""
    return _length_keys(metric_keys, names.LONG_CONTEXT_PREFIX, names.LOSS_SO_FAR, names.LONG_CONTEXT_LANGS)


def retrieval_keys(metric_keys: Sequence[str]) -> dict[str, tuple[str, int]]:
    """{key: (task, L)} of the retrieval accuracy per prompt length (`retrieval/<task>/acc/<L>`; not the overall
    `retrieval/<task>/acc` nor the per-depth `retrieval/<task>/acc/<L>/<depth>`)."""
    return _length_keys(metric_keys, names.RETRIEVAL_PREFIX, names.RETRIEVAL_ACC, None)


def eval_length_keys(metric_keys: Sequence[str]) -> list[str]:
    """The long-context and retrieval keys among `metric_keys`, sorted: read in full, kept as they are."""
    return sorted({*long_context_keys(metric_keys), *retrieval_keys(metric_keys)})


def clean(steps: np.ndarray, times_ms: np.ndarray, values: np.ndarray) -> Series:
    """Sorted by step, the last value by timestamp for a step logged twice; MLflow's +-DBL_MAX (inf) -> +-inf."""
    order = np.lexsort((times_ms, steps))
    steps, times_ms, values = steps[order], times_ms[order], values[order].astype(np.float64)
    last = np.ones(len(steps), dtype=bool)
    last[:-1] = steps[1:] != steps[:-1]
    values = values[last]
    big = np.abs(values) >= INF_FROM
    values[big] = np.copysign(np.inf, values[big])
    return Series(steps[last].astype(np.int64), values, times_ms[last].astype(np.int64))


def mean_over_layers(per_layer: list[Series]) -> Series:
    """Per step, the mean over the layers that logged a finite value at that step; the latest time."""
    steps = np.concatenate([s.steps for s in per_layer])
    vals = np.concatenate([s.values for s in per_layer])
    ts = np.concatenate([s.times_ms for s in per_layer])
    uniq, inv = np.unique(steps, return_inverse=True)
    ok = np.isfinite(vals)
    total = np.bincount(inv[ok], weights=vals[ok], minlength=len(uniq))
    count = np.bincount(inv[ok], minlength=len(uniq))
    t = np.full(len(uniq), np.iinfo(np.int64).min)
    np.maximum.at(t, inv, ts)
    mean = np.full(len(uniq), np.nan)
    np.divide(total, count, out=mean, where=count > 0)
    return Series(uniq.astype(np.int64), mean, t)


def _assemble(runs: Sequence[RunRecord], raw: dict[str, dict[str, Series]]) -> dict[str, History]:
    """{run id: {HISTORY_KEYS..., long-context and retrieval keys, router/mean/<stat>}} from the per-key series."""
    out: dict[str, History] = {}
    for r in runs:
        series = raw.get(r.run_id, {})
        evals = set(eval_length_keys(list(series)))
        hist = {k: v for k, v in series.items() if k in names.HISTORY_KEYS or k in evals}
        by_stat: dict[str, list[Series]] = {}
        for key, stat in router_layer_keys(list(series)).items():
            by_stat.setdefault(stat, []).append(series[key])
        for stat, per_layer in by_stat.items():
            hist[f"{names.ROUTER_MEAN_PREFIX}/{stat}"] = mean_over_layers(per_layer)
        out[r.run_id] = hist
    return out


# ----------------------------------------------------------------------------------------------------------
# sqlite: one query


def read_sqlite(store: Store, runs: Sequence[RunRecord]) -> dict[str, History]:
    """The histories of `runs` (all in this sqlite store): one query (per RUNS_PER_QUERY runs), read-only."""
    path = store.sqlite_path
    if path is None:
        raise CompareError(f"store {store}: not a sqlite store")
    raw: dict[str, dict[str, Series]] = {}
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as e:
        raise CompareError(f"store {store}: cannot open it read-only: {e}") from None
    try:
        for i in range(0, len(runs), RUNS_PER_QUERY):
            for rid, key, series in _query_sqlite(con, runs[i : i + RUNS_PER_QUERY]):
                raw.setdefault(rid, {})[key] = series
    except sqlite3.Error as e:
        raise CompareError(f"store {store}: reading metrics failed: {e}") from None
    finally:
        con.close()
    return _assemble(runs, raw)


SERIES_COLUMNS = (
    "run_uuid, key, group_concat(step), group_concat(timestamp), "
    "group_concat(CASE WHEN is_nan THEN 'nan' ELSE printf('%!.17g', value) END)"
)


def _query_sqlite(con: sqlite3.Connection, runs: Sequence[RunRecord]):
    """Yields (run id, key, Series) of every history of `runs` that the comparison reads."""
    run_ids = [r.run_id for r in runs]
    keys = [k for k in names.HISTORY_KEYS if k != names.CONSUMED_SAMPLES]
    if any(names.TOKENS not in r.latest for r in runs):
        keys.append(names.CONSUMED_SAMPLES)  # the fallback for tokens
    keys += eval_length_keys(sorted({k for r in runs for k in r.latest}))  # offline evaluations: a few points each
    router: list[str] = sorted({k for r in runs for k in router_layer_keys(list(r.latest))})
    in_runs, in_keys = ",".join("?" * len(run_ids)), ",".join("?" * len(keys))
    sql = (f"SELECT {SERIES_COLUMNS} FROM metrics WHERE run_uuid IN ({in_runs}) AND key IN ({in_keys}) "
           "GROUP BY run_uuid, key")  # fmt: skip
    args: list = [*run_ids, *keys]
    if router:
        in_router = ",".join("?" * len(router))
        # every n-th step, n from the largest logged step of these keys (latest_metrics: one row per run and key)
        stride = (f"(SELECT MAX(1, MAX(step) / {ROUTER_POINTS}) FROM latest_metrics WHERE run_uuid IN ({in_runs}) "
                  f"AND key IN ({in_router}))")  # fmt: skip
        sql += (f" UNION ALL SELECT {SERIES_COLUMNS} FROM metrics WHERE run_uuid IN ({in_runs}) AND key IN "
                f"({in_router}) AND step % {stride} = 0 GROUP BY run_uuid, key")  # fmt: skip
        args += [*run_ids, *router, *run_ids, *router]
    cur = con.execute(sql, args)
    while rows := cur.fetchmany(FETCH_GROUPS):
        for rid, key, steps, times, values in rows:
            s = np.fromstring(steps, dtype=np.int64, sep=",")
            t = np.fromstring(times, dtype=np.int64, sep=",")
            v = np.fromstring(values, dtype=np.float64, sep=",")
            if not len(s) == len(t) == len(v):
                raise sqlite3.DatabaseError(f"run {rid} metric {key}: unreadable history")
            yield rid, key, clean(s, t, v)


# ----------------------------------------------------------------------------------------------------------
# other stores: the MLflow client


def client_keys(run: RunRecord) -> list[str]:
    """The metrics whose history the client path reads for `run`: the HISTORY_KEYS it logged (consumed samples
    only without train/tokens), the long-context and retrieval keys, and every per-layer router statistic."""
    keys = [k for k in names.HISTORY_KEYS if k in run.latest]
    if names.TOKENS in run.latest and names.CONSUMED_SAMPLES in keys:
        keys.remove(names.CONSUMED_SAMPLES)
    return keys + eval_length_keys(list(run.latest)) + sorted(router_layer_keys(list(run.latest)))


def _client_history(client, run_id: str, key: str) -> tuple[str, str, Series]:
    points = client.get_metric_history(run_id, key)
    steps = np.array([p.step for p in points], dtype=np.int64)
    ts = np.array([p.timestamp for p in points], dtype=np.int64)
    vals = np.array([p.value for p in points], dtype=np.float64)
    return run_id, key, clean(steps, ts, vals)


def read_client(store: Store, runs: Sequence[RunRecord], progress: bool = False) -> dict[str, History]:
    """The histories through the MLflow client (http and other stores): one call per run and key, threaded.
    The router statistics are read in full (no stride: the REST API has no step filter)."""
    from mlflow import MlflowClient
    from tqdm import tqdm

    client = MlflowClient(tracking_uri=store.uri)
    jobs = [(r.run_id, k) for r in runs for k in client_keys(r)]
    raw: dict[str, dict[str, Series]] = {}
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        futures = [pool.submit(_client_history, client, rid, key) for rid, key in jobs]
        bar = tqdm(futures, desc=f"histories from {store}", unit="series", disable=not progress, leave=False)
        for f in bar:
            try:
                rid, key, series = f.result()
            except Exception as e:
                raise CompareError(f"store {store}: reading a metric history failed: {e}") from None
            raw.setdefault(rid, {})[key] = series
    return _assemble(runs, raw)


def read_histories(runs: Sequence[RunRecord], progress: bool = False) -> dict[str, History]:
    """{run id: {key: Series}} for every run: the HISTORY_KEYS it logged, its long-context and retrieval
    per-length metrics, and `router/mean/<stat>`."""
    from tqdm import tqdm

    by_store: dict[Store, list[RunRecord]] = {}
    for r in runs:
        by_store.setdefault(r.store, []).append(r)
    out: dict[str, History] = {}
    bar = tqdm(by_store.items(), desc="reading metric histories", unit="store", disable=not progress)
    for store, store_runs in bar:
        if store.kind == "sqlite":
            out.update(read_sqlite(store, store_runs))
        else:
            out.update(read_client(store, store_runs, progress))
    return out
