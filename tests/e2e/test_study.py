"""`slurm/study.sh` on the real single-node Slurm of tests/helpers/slurm_cluster.py, with a real `mlflow server`.

Three tiny configs (FM, attention, Mamba-2; a few steps each) are submitted with an evaluation job after each
training (afterok) and a comparison job after all (afterany); every run logs over HTTP into one experiment of
the server. The test waits for every job with a polling deadline, then reads the comparison's table and PNGs back
as artifacts with MlflowClient, checks the table against each run's metrics.jsonl, and compares over HTTP and from
the server's sqlite file with equal tables. Needs root and slurm-wlm + munge (skipped otherwise), like test_slurm.py.
The dry run (validation, the printed dependency chain, bad input) needs neither.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from fm_pretrain.compare.cli import CompareOptions, run_compare
from fm_pretrain.compare.report import read_csv, render_csv
from tests.compare.handmade import TINY_TRAINING
from tests.compare.jsonl_check import check_row_against_jsonl
from tests.helpers.mlflow_server import MlflowServer
from tests.helpers.paths import REPO
from tests.helpers.train_runs import data_overrides

STUDY = REPO / "slurm" / "study.sh"
EXPERIMENT = "e2e-study"
CONFIGS = {"tiny_fm": "fm", "tiny_attention": "attention", "tiny_mamba2": "mamba2"}  # config name -> model type
# The node has 2 CPUs and no GPUs: one rank per training (NPROC_PER_NODE=1), one CPU per job, so two jobs run at once.
TRAIN_SBATCH = "--gres=none --oversubscribe --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --time=30 --mem=0"
EVAL_SBATCH = "--gres=none --cpus-per-task=1 --time=30 --mem=0"
COMPARE_SBATCH = "--cpus-per-task=1 --time=30 --mem=0"
EVAL_ARGS = "--tasks arc_easy,jnli --limit 4 --batch-size 4"  # one EN and one JA task, a few items each
SEQ_LEN = 64  # data.seq_len of configs/tiny_*.yaml
DEADLINE_S = 1800


@pytest.mark.slow
def test_study_trains_evaluates_and_compares_every_run_in_one_experiment(cluster, packed, tmp_path):
    runs_root = tmp_path / "study"
    with MlflowServer(tmp_path / "mlflow") as server:
        cmd = ["bash", str(STUDY), "--experiment", EXPERIMENT, "--runs-root", str(runs_root), "--tracking-uri",
               server.uri, "--train-sbatch", TRAIN_SBATCH, "--eval-sbatch", EVAL_SBATCH, "--compare-sbatch",
               COMPARE_SBATCH, "--eval-args", EVAL_ARGS, *(f"configs/{c}.yaml" for c in CONFIGS), "--",
               *data_overrides(packed), *TINY_TRAINING]  # fmt: skip
        env = {**cluster.env, "NPROC_PER_NODE": "1"}
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"study.sh failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        train = dict(re.findall(r"^study: train (\S+) (\d+) ", out.stdout, re.M))
        evals = dict(re.findall(r"^study: eval (\S+) (\d+)$", out.stdout, re.M))
        compare_job, report_dir = re.search(r"^study: compare (\d+) (\S+)$", out.stdout, re.M).groups()
        assert set(train) == set(evals) == set(CONFIGS), out.stdout

        jobs = [*train.values(), *evals.values(), compare_job]
        logs = {j: runs_root / f"slurm-{j}-{n}.out" for n, j in train.items()}
        logs |= {j: runs_root / f"slurm-{j}-{n}-eval.out" for n, j in evals.items()}
        logs[compare_job] = runs_root / f"slurm-{compare_job}-compare.out"
        records = cluster.wait_jobs(jobs, timeout=DEADLINE_S)
        tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:] if p.exists() else '(missing)'}"
                          for p in logs.values())  # fmt: skip
        states = {j: (r.get("JobState"), r.get("ExitCode")) for j, r in records.items()}
        assert all(s == ("COMPLETED", "0:0") for s in states.values()), f"{states}\n{tails}"
        assert Path(report_dir) == runs_root / "compare" and (runs_root / "compare" / "table.csv").is_file()

        # the comparison run: the report read back as artifacts of the one run tagged kind=comparison
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        comparisons = client.search_runs([exp.experiment_id], "tags.kind = 'comparison'")
        assert len(comparisons) == 1, tails
        run_id = comparisons[0].info.run_id
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
        files = {p.name for p in local.iterdir()}
        assert {"table.csv", "table.md", "table.txt", "report.html", "summary.json"} <= files
        pngs = {p.name: imread(p) for p in (local / "plots").glob("*.png")}
        for name in ("val_loss_vs_tokens.png", "val_loss_vs_wallclock.png", "train_loss_smoothed.png",
                     "throughput.png", "downstream.png"):  # fmt: skip
            assert name in pngs and pngs[name].ndim == 3 and pngs[name].shape[0] > 100, (name, sorted(pngs))
        rows = {r["run"]: r for r in read_csv((local / "table.csv").read_text())}
        assert set(rows) == set(CONFIGS)  # run names are the run dirs' names, the configs' names
        for name, model_type in CONFIGS.items():
            row = rows[name]
            assert row["model_type"] == model_type and row["status"] == "FINISHED", row
            assert row["val_loss_final"] and row["tokens"], row
            assert row["task:arc_easy"] and row["task:jnli"], f"the eval job's scores are missing: {row}"
            assert row["downstream_en"] and row["downstream_ja"], row

        # the same table over HTTP and from the server's sqlite file, and its numbers from each run's metrics.jsonl
        tables = [
            run_compare(
                CompareOptions(
                    stores=[store], experiments=[EXPERIMENT], out=str(tmp_path / tag), mlflow=False, progress=False
                )
            ).table  # fmt: skip
            for tag, store in (("http", server.uri), ("file", str(server.db)))
        ]
        assert render_csv(tables[0]) == render_csv(tables[1])
        for row in tables[0].rows:
            check_row_against_jsonl(row, runs_root / row["run"], SEQ_LEN)


def test_study_dry_run_validates_first_and_prints_the_dependency_chain(tmp_path):
    """No Slurm needed: --dry-run validates configs and store, then prints the sbatch commands it would run."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["bash", str(STUDY), "--dry-run", "--tracking-uri", store, "--runs-root", str(tmp_path / "study"),
            "--experiment", "dry"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CONFIG", "RUN_DIR", "CHECKPOINT")}
    run = lambda *args: subprocess.run([*base, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    out = run("configs/tiny_fm.yaml", "configs/tiny_mamba2.yaml", "--", "train.steps=2")
    assert out.returncode == 0, out.stderr
    train = dict(re.findall(r"^study: train (\S+) (\S+) ", out.stdout, re.M))
    evals = dict(re.findall(r"^study: eval (\S+) (\S+)$", out.stdout, re.M))
    assert set(train) == set(evals) == {"tiny_fm", "tiny_mamba2"}
    assert "a sqlite store" in out.stderr  # the warning: concurrent writers want a server
    sbatch = [line for line in out.stderr.splitlines() if line.startswith("dry-run:")]
    assert len(sbatch) == 5
    assert f"CONFIG=configs/tiny_fm.yaml RUN_DIR={tmp_path / 'study' / 'tiny_fm'} sbatch" in sbatch[0]
    assert "train.steps=2 tracking.experiment=dry" in sbatch[0]
    assert f"--dependency=afterok:{train['tiny_fm']} --kill-on-invalid-dep=yes" in sbatch[1]
    deps = ":".join([train["tiny_fm"], evals["tiny_fm"], train["tiny_mamba2"], evals["tiny_mamba2"]])
    assert f"--dependency=afterany:{deps}" in sbatch[4] and f"--store {store}" in sbatch[4]

    bad = run("--runs-root", str(tmp_path / "bad"), "configs/tiny_fm.yaml", "--", "train.stepz=2")
    assert bad.returncode == 2 and "train.stepz" in bad.stderr and "dry-run:" not in bad.stderr
    assert not (tmp_path / "bad").exists()  # nothing is created before every config is valid
    missing = run("configs/nope.yaml")
    assert missing.returncode == 2 and "config file not found: configs/nope.yaml" in missing.stderr
    no_store = subprocess.run(["bash", str(STUDY), "configs/tiny_fm.yaml"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    assert no_store.returncode == 2 and "no tracking store" in no_store.stderr
