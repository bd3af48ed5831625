"""The README's main command, reduced to a few steps: it must train end to end and the validation loss must fall."""

import json
import subprocess
import sys

import pytest

from fm_pretrain.launch import train_env
from tests.helpers.paths import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_validation_loss_falls(tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fm_pretrain.demo", "--steps", "40", "--run-dir", str(run_dir)],
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert val[0][0] == 0 and val[-1][0] == 40
    assert val[-1][1] < val[0][1] - 0.5, f"validation loss did not fall: {val}"
    assert "validation loss fell" in result.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db" in result.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_40"
    results = json.loads((run_dir / "downstream" / "step_40" / "eval_results.json").read_text())
    assert len(results["tasks"]) == 17 and all(t["counts"]["scored"] == 20 for t in results["tasks"].values())
    assert "downstream evaluation of 17 EN/JA tasks" in result.stdout
