"""Real multi-rank DeepSpeed runs on CPU (gloo): ZeRO stages agree, resume is exact, MLflow holds the run.

Each test launches `fm_pretrain/train.py` under torchrun with 2 ranks, as users do.
"""

import shutil
from pathlib import Path

import pytest
import torch

from fm_pretrain.launch import launch_local
from tests.helpers.train_runs import CONFIG, TINY_HYBRID, data_overrides, run_training

pytestmark = pytest.mark.slow
SMALL = [
    *TINY_HYBRID,
    "train.grad_accum=2",
]


def train(packed: Path, run_dir: Path, *overrides: str) -> list[dict]:
    return run_training(run_dir, [*data_overrides(packed), *SMALL, *overrides])


def series(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def test_zero_stages_give_the_same_fp32_losses_and_bf16_is_close(packed, tmp_path):
    losses = {}
    for stage in (0, 1, 2, 3):
        rows = train(packed, tmp_path / f"zero{stage}", "train.steps=4", "train.val_every=4",
                     f"train.ds_config=ds_configs/zero{stage}.json")  # fmt: skip
        losses[stage] = series(rows, "train/loss")
        assert sorted(losses[stage]) == [1, 2, 3, 4]
    ref = torch.tensor([losses[0][s] for s in range(1, 5)], dtype=torch.float64)
    for stage in (1, 2, 3):
        got = torch.tensor([losses[stage][s] for s in range(1, 5)], dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} differs from ZeRO-0")
    assert ref[-1] < ref[0], "loss did not move down over 4 steps"

    # bf16 (DeepSpeed bf16 with ZeRO-1; the recurrent state stays fp32) tracks the fp32 run closely.
    rows = train(packed, tmp_path / "bf16", "train.steps=4", "train.val_every=4", "train.precision=bf16",
                 "train.ds_config=ds_configs/zero1.json")  # fmt: skip
    bf16 = torch.tensor([series(rows, "train/loss")[s] for s in range(1, 5)], dtype=torch.float64)
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16, ref, rtol=2e-2, atol=0, msg="bf16 losses stray from fp32")
    assert not torch.equal(bf16, ref), "the bf16 run computed exactly the fp32 losses: was bf16 applied?"


@pytest.fixture(scope="module")
def resumed_run(packed, tmp_path_factory):
    """A 6-step run checkpointed at steps 3 and 6, then rewound to step 3 and resumed to the end."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    opts = ("train.steps=6", "train.save_every=3", "train.val_every=3", "train.ds_config=ds_configs/zero2.json")
    first = train(packed, run_dir, *opts)
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_6"
    shutil.rmtree(ckpt / "step_6")
    (ckpt / "latest").write_text("step_3")
    (run_dir / "metrics.jsonl").rename(run_dir / "metrics_first.jsonl")
    second = train(packed, run_dir, *opts)
    return run_dir, first, second


def test_resume_continues_with_identical_losses(resumed_run):
    _, first, second = resumed_run
    want, got = series(first, "train/loss"), series(second, "train/loss")
    assert sorted(got) == [4, 5, 6], "the resumed run did not start after the step-3 checkpoint"
    for step in (4, 5, 6):
        assert got[step] == want[step], f"step {step}: resumed loss {got[step]!r} != uninterrupted {want[step]!r}"
    assert series(second, "val/loss")[6] == series(first, "val/loss")[6]
    assert series(second, "train/consumed_samples")[6] == series(first, "train/consumed_samples")[6]


def test_mlflow_store_holds_params_metrics_and_artifacts(resumed_run):
    from mlflow import MlflowClient

    run_dir, first, _ = resumed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    params = run.data.params
    assert params["model.fm.n_memories"] == "8" and params["model.fm.top_k"] == "2"
    assert params["train.steps"] == "6" and params["data.seq_len"] == "64"
    assert run.data.tags["model_type"] == "hybrid-attention+fm+mamba2"
    assert "git_commit" in run.data.tags
    history = client.get_metric_history(run_id, "train/loss")
    # The resumed run logs into the same MLflow run: steps 1-6, with 4-6 logged twice (same values).
    assert {m.step for m in history} == {1, 2, 3, 4, 5, 6}
    by_step = series(first, "train/loss")
    for m in history:
        assert m.value == pytest.approx(by_step[m.step], rel=1e-12)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "tokenizer", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "tokenizer")] == ["tokenizer/tokenizer.model"]
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(run_id, "plots")}


def test_missing_data_path_is_named(packed, tmp_path):
    missing = tmp_path / "no_such_dir"
    log = tmp_path / "run.log"
    result = launch_local(CONFIG, [f"data.path={missing}", "data.tokenizer=''", f"train.run_dir={tmp_path / 'r'}"],
                          nproc=1, log_file=log, timeout=300)  # fmt: skip
    assert result.returncode != 0
    out = log.read_text()
    assert f"error: packed data directory not found: {missing}" in out, out[-2000:]


def test_the_run_logs_what_comparisons_filter_on_and_router_statistics(resumed_run):
    """n_params / flops_per_token params, kind / layer_pattern tags, tokens seen, and the FM layer's router
    statistics per log line with a usage heatmap at each validation (the hybrid's FM layer is layer 0, top-2 of 8)."""
    import math

    from mlflow import MlflowClient

    run_dir, first, second = resumed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert int(run.data.params["n_params"]) > 0 and float(run.data.params["flops_per_token"]) > 0
    assert run.data.tags["kind"] == "training" and run.data.tags["layer_pattern"] == "fm,attention,mamba2"
    for rows in (first, second):
        for r in (r for r in rows if "train/loss" in r):
            assert r["train/tokens"] == r["train/consumed_samples"] * 64
            assert 0 <= r["router/layer0/entropy"] <= math.log(2) + 1e-6  # top-2: at most log(k)
            assert 0 <= r["router/layer0/dead_rows"] <= 7
            assert 1 / 8 - 1e-9 <= r["router/layer0/max_load"] <= 1
    assert {"router/usage_step_3.png", "router/usage_step_6.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "router")
    }
