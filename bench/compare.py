"""Run comparison speed: `python -m fm_pretrain.compare` on a generated sqlite store, against MLflow's naive loop.

    python bench/compare.py [--runs 50] [--steps 20000] [--store /tmp/fm-compare-bench] [--regenerate]

1. Generates (once; reused while --runs/--steps match) an MLflow sqlite store of `runs` training runs with
   `steps` logged steps each, in MLflow's own schema: MLflow creates the database, experiment and runs (with the
   flattened configs/fm_1b.yaml as params, the trainer's tags), then the metric rows are bulk-inserted with
   sqlite3 into `metrics` and `latest_metrics`. Per logged step every run has the trainer's 8 metrics
   (train/loss, train/lr, train/grad_norm, train/consumed_samples, train/tokens, perf/tokens_per_s,
   perf/step_time_s, perf/mfu); every 100 steps val/loss and val/ppl; at the end 34 downstream metrics; every
   third run is an FM run that also logs router statistics of 4 layers (16 metrics) per step. Not timed.
2. Times, each in its own subprocess (wall-clock, and peak RSS from the child's own rusage):
   - `compare (full CLI)`: `python -m fm_pretrain.compare --store DB --experiment bench --out DIR` end to end
     (interpreter start, selection, reading, table, 7 plots, report files, logging the comparison run);
   - `compare: histories only`: selection + `fm_pretrain.compare.history.read_histories` (one SQL query);
   - `naive: get_metric_history loop`: selection + `MlflowClient.get_metric_history(run_id, key)` for each run
     and each key the comparison reads (`history.client_keys`: the same histories, into numpy arrays; the router
     statistics in full, where the SQL query reads them at every n-th step).
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "bench"
CORE = ("train/loss", "train/lr", "train/grad_norm", "train/consumed_samples", "train/tokens",
        "perf/tokens_per_s", "perf/step_time_s", "perf/mfu")  # fmt: skip
VAL_EVERY = 100
ROUTER_LAYERS = 4
GLOBAL_BATCH, SEQ_LEN = 512, 1024
T0 = 1_760_000_000_000


def _series(run: int, fm: bool, steps: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    s = np.arange(1, steps + 1)
    scale = 1.0 + 0.02 * run
    loss = 2.4 * scale + 8.0 * np.exp(-s / (steps / 10)) + rng.normal(0, 0.05, steps)
    tok_s = 4.0e5 * (1.2 if fm else 1.0) + rng.normal(0, 5e3, steps)
    out = {
        "train/loss": (s, loss),
        "train/lr": (s, 3e-4 * np.minimum(1.0, s / 2000) * (0.5 + 0.5 * np.cos(np.pi * s / steps))),
        "train/grad_norm": (s, 0.5 + rng.random(steps)),
        "train/consumed_samples": (s, (s * GLOBAL_BATCH).astype(np.float64)),
        "train/tokens": (s, (s * GLOBAL_BATCH * SEQ_LEN).astype(np.float64)),
        "perf/tokens_per_s": (s, tok_s),
        "perf/step_time_s": (s, GLOBAL_BATCH * SEQ_LEN / tok_s),
        "perf/mfu": (s, tok_s / 1.0e6),
    }
    v = np.arange(0, steps + 1, VAL_EVERY)
    val = 2.5 * scale + 8.0 * np.exp(-v / (steps / 10))
    out["val/loss"], out["val/ppl"] = (v, val), (v, np.exp(val))
    if fm:
        for layer in range(ROUTER_LAYERS):
            out[f"router/layer{layer}/entropy"] = (s, np.log(128) - 0.5 * (1 - np.exp(-s / steps)) - 0.1 * layer)
            out[f"router/layer{layer}/dead_rows"] = (s, np.floor(4 * (1 - np.exp(-s / 5000))) + layer)
            out[f"router/layer{layer}/max_load"] = (s, 0.02 + 0.01 * rng.random(steps))
            out[f"router/layer{layer}/mean_load"] = (s, np.full(steps, 1 / 128))
    from fm_pretrain.eval.tasks import TASKS

    for task in TASKS.values():
        for metric in task.metrics:
            out[f"downstream/{task.name}/{metric}"] = (np.array([steps]), np.array([0.3 + 0.01 * run]))
    return out


def generate(db: Path, runs: int, steps: int) -> None:
    """The store: MLflow creates database, experiment and runs; metric rows are bulk-inserted (not timed)."""
    import yaml
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag
    from tqdm import tqdm

    from fm_pretrain.config import flatten
    from fm_pretrain.tracking import ensure_store

    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists():
        db.unlink()
    uri = f"sqlite:///{db}"
    exp_id = ensure_store(uri, EXPERIMENT)
    client = MlflowClient(tracking_uri=uri)
    base = flatten(yaml.safe_load((REPO / "configs" / "fm_1b.yaml").read_text()))
    rng = np.random.default_rng(0)
    run_ids = []
    for i in tqdm(range(runs), desc="runs (MLflow)", unit="run"):
        fm = i % 3 == 0
        pattern = ["fm"] if fm else ["attention"] if i % 3 == 1 else ["mamba2"]
        run = client.create_run(exp_id, run_name=f"run-{i:03d}-{pattern[0]}", start_time=T0)
        params = {**base, "model.layer_pattern": str(pattern), "model.fm.top_k": [8, 32, None][(i // 3) % 3],
                  "n_params": 1.2e9 + 1e7 * i, "flops_per_token": 6 * 1.2e9}  # fmt: skip
        tags = {"model_type": pattern[0], "size": "1b", "layer_pattern": pattern[0], "world_size": "8",
                "device": "NVIDIA H200", "kind": "training"}  # fmt: skip
        items = [Param(k, str(v)) for k, v in params.items()]
        for j in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[j : j + 100])
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run.info.run_id, end_time=T0 + steps * 2000)
        run_ids.append((run.info.run_id, fm))
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    total = 0
    for i, (run_id, fm) in enumerate(tqdm(run_ids, desc="metric rows (sqlite3)", unit="run")):
        series = _series(i, fm, steps, rng)
        for key, (s, v) in series.items():
            ts = T0 + s.astype(np.int64) * 2000 + 1
            rows = zip([key] * len(s), v.tolist(), ts.tolist(), [run_id] * len(s), s.tolist(), [0] * len(s),
                       strict=True)  # fmt: skip
            con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES "
                            "(?, ?, ?, ?, ?, ?)", rows)  # fmt: skip
            con.execute("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES "
                        "(?, ?, ?, ?, 0, ?)", (key, float(v[-1]), int(ts[-1]), int(s[-1]), run_id))  # fmt: skip
            total += len(s)
        con.commit()
    con.close()
    (db.parent / "bench.json").write_text(json.dumps({"runs": runs, "steps": steps, "rows": total}) + "\n")
    print(f"generated {db}: {runs} runs x {steps} steps, {total:,} metric rows, {db.stat().st_size / 2**30:.2f} GiB")


def _naive(uri: str) -> dict:
    from mlflow import MlflowClient

    from fm_pretrain.compare import names
    from fm_pretrain.compare.history import client_keys
    from fm_pretrain.compare.select import resolve_stores, select_runs

    store = resolve_stores([uri])[0]
    runs = select_runs([store], [EXPERIMENT]).runs
    client = MlflowClient(tracking_uri=uri)
    kept, points, core = {}, 0, 0
    for r in runs:
        for key in client_keys(r):  # the keys our client fallback reads (router statistics in full)
            hist = client.get_metric_history(r.run_id, key)
            kept[(r.run_id, key)] = (np.array([m.step for m in hist]), np.array([m.value for m in hist]))
            points += len(hist)
            core += len(hist) if key in names.HISTORY_KEYS else 0
    return {"runs": len(runs), "series": len(kept), "points": points, "core_points": core}


def _ours(uri: str) -> dict:
    from fm_pretrain.compare.history import read_histories
    from fm_pretrain.compare.select import resolve_stores, select_runs

    store = resolve_stores([uri])[0]
    runs = select_runs([store], [EXPERIMENT]).runs
    from fm_pretrain.compare import names

    hist = read_histories(runs)
    series = [(k, s) for h in hist.values() for k, s in h.items()]
    return {"runs": len(runs), "series": len(series), "points": sum(len(s) for _, s in series),
            "core_points": sum(len(s) for k, s in series if k in names.HISTORY_KEYS)}  # fmt: skip


def _child(cmd: list[str]) -> dict:
    """Run cmd; its wall time and peak RSS (its own rusage, via wait4), and its last stdout line as JSON if any.

    (ru_maxrss survives fork and exec on Linux, so it is the child's own peak only because this driver, which
    imports numpy and nothing heavy, is smaller than any child.)"""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with {proc.returncode}:\n{out[-3000:]}")
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    try:
        info = json.loads(last)
    except json.JSONDecodeError:
        info = {}
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, **info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--store", type=Path, default=Path("/tmp/fm-compare-bench"))
    p.add_argument("--regenerate", action="store_true")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--phase", choices=["generate", "ours", "naive"], help=argparse.SUPPRESS)  # the children
    a = p.parse_args()
    db = a.store.resolve() / "mlflow.db"
    uri = f"sqlite:///{db}"
    if a.phase == "generate":
        generate(db, a.runs, a.steps)
        return
    if a.phase:
        print(json.dumps(_ours(uri) if a.phase == "ours" else _naive(uri)))
        return
    meta = a.store / "bench.json"
    same = meta.is_file() and {k: json.loads(meta.read_text())[k] for k in ("runs", "steps")} == {
        "runs": a.runs, "steps": a.steps}  # fmt: skip
    if a.regenerate or not same or not db.is_file():
        # in a child, so that this driver stays small: Linux carries a parent's peak RSS into its children
        gen = [sys.executable, __file__, "--store", str(a.store), "--runs", str(a.runs), "--steps", str(a.steps)]
        subprocess.run([*gen, "--phase", "generate"], check=True, cwd=REPO)
    rows = json.loads(meta.read_text())["rows"]
    print(f"store {db}: {a.runs} runs x {a.steps} steps, {rows:,} metric rows, {db.stat().st_size / 2**30:.2f} GiB")
    out_dir = a.store / "report"
    cli = [sys.executable, "-m", "fm_pretrain.compare", "--store", str(db), "--experiment", EXPERIMENT, "--out",
           str(out_dir), "--no-progress"]  # fmt: skip
    results = {
        "compare (full CLI)": _child(cli),
        "compare: histories only": _child([sys.executable, __file__, "--store", str(a.store), "--phase", "ours"]),
    }
    if not a.skip_naive:
        results["naive: get_metric_history loop"] = _child(
            [sys.executable, __file__, "--store", str(a.store), "--phase", "naive"]
        )
    print("\n| what | wall s | peak RSS MiB | series | points |\n|---|---|---|---|---|")
    for name, r in results.items():
        points = f"{r['points']:,}" if "points" in r else ""
        print(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {r.get('series', '')} | {points} |")
    if "naive: get_metric_history loop" in results:
        ours, naive = results["compare: histories only"], results["naive: get_metric_history loop"]
        # the same histories; ours reads the router statistics at a stride, so compare the other keys' points
        assert ours["core_points"] == naive["core_points"], f"read {ours['core_points']} vs {naive['core_points']}"
        print(f"\nhistories: {naive['wall_s'] / ours['wall_s']:.1f}x faster than the naive loop "
              f"({naive['wall_s']:.1f} s -> {ours['wall_s']:.1f} s)")  # fmt: skip
    print(f"cpu: {os.cpu_count()} cores; python {sys.version.split()[0]}; date {time.strftime('%Y-%m-%d')}; "
          f"max RSS of this driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
