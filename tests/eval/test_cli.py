"""The evaluation CLI end to end on a checkpoint of a real (short) training run: eval_results.json in the step
directory, metrics at the checkpoint's step in the training's MLflow run (or a new run), the chart artifact."""

import json

import pytest
import torch

from fm_pretrain.checkpoint import load_model
from fm_pretrain.eval.cli import main
from tests.helpers.train_runs import TINY_HYBRID, data_overrides, run_training

pytestmark = pytest.mark.slow
TASKS = "boolq,winogrande,lambada_openai,jcommonsenseqa,niilc,mgsm_ja"
IN_TRAINING_TASKS = "arc_easy,xwinograd_jp,jsquad"  # evaluated by train.py itself (config section `eval`)


@pytest.fixture(scope="module")
def trained(packed, tmp_path_factory):
    """A 2-step run of the tiny FM + attention + Mamba-2 hybrid, checkpointed at step 2 (ZeRO-1, 2 ranks), which
    also runs downstream evaluation itself after steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    opts = ["train.steps=2", "train.save_every=2", "train.val_every=2", "train.ds_config=ds_configs/zero1.json"]
    evals = ["downstream.enabled=true", "downstream.every=1", f"downstream.tasks={IN_TRAINING_TASKS}"]
    evals.append("downstream.limit=2")
    run_training(run_dir, [*data_overrides(packed), *TINY_HYBRID, *opts, *evals], nproc=2)
    return run_dir


def test_training_evaluates_downstream_and_matches_the_offline_cli(trained):
    """train.py's own evaluation (downstream.enabled) logs downstream/<task>/<metric> at steps 1 and 2 into its
    run, and its step-2 results equal the CLI's on the step-2 checkpoint: the same weights, prompts and scoring."""
    from mlflow import MlflowClient

    in_training = json.loads((trained / "downstream" / "step_2" / "eval_results.json").read_text())
    assert (trained / "downstream" / "step_1" / "accuracy.png").is_file()
    assert list(in_training["tasks"]) == IN_TRAINING_TASKS.split(",")
    argv = ["--checkpoint", str(trained / "checkpoints" / "step_2"), "--tasks", IN_TRAINING_TASKS]
    assert main([*argv, "--limit", "2", "--no-mlflow", "--no-progress"]) == 0
    offline = json.loads((trained / "checkpoints" / "step_2" / "eval_results.json").read_text())
    for name, res in in_training["tasks"].items():
        assert res["counts"]["scored"] == 2, name
        for metric, value in res["metrics"].items():
            assert offline["tasks"][name]["metrics"][metric] == pytest.approx(value, abs=1e-9), f"{name}/{metric}"

    client = MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlflow.db'}")
    run_id = (trained / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "downstream/arc_easy/acc_norm")
    assert sorted(m.step for m in history) == [1, 2]
    assert {a.path for a in client.list_artifacts(run_id, "downstream/step_1")} == {
        "downstream/step_1/eval_results.json",
        "downstream/step_1/accuracy.png",
    }


def test_cli_writes_results_and_logs_into_the_training_run(trained, capsys):
    from mlflow import MlflowClient

    step_dir = trained / "checkpoints" / "step_2"
    argv = ["--checkpoint", str(trained), "--tasks", TASKS, "--limit", "3", "--num-fewshot", "1", "--no-progress"]
    assert main(argv) == 0  # a run directory resolves to its latest checkpoint
    out = capsys.readouterr().out
    assert "jcommonsenseqa" in out and "downstream/<task>/<metric> at step 2" in out

    results = json.loads((step_dir / "eval_results.json").read_text())
    assert results["step"] == 2 and results["model_type"] == "hybrid-attention+fm+mamba2"
    assert list(results["tasks"]) == TASKS.split(",")
    for name, res in results["tasks"].items():
        assert res["counts"]["scored"] == 3 and res["counts"]["limited_out"] == res["counts"]["rows"] - 3, name
        assert res["fewshot_from"] is not None
    assert results["tasks"]["jcommonsenseqa"]["fewshot_from"] == "ja/jcommonsenseqa/train.jsonl"

    # the weights evaluated are the trained ones: the universal form equals DeepSpeed's fp32 module states
    model, cfg, meta = load_model(step_dir)
    states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, states[name].float(), rtol=0, atol=0, msg=name)
    assert meta["step"] == 2 and cfg.model.layer_pattern == ["fm", "attention", "mamba2"]

    client = MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlflow.db'}")
    run_id = (trained / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # the training run's status is left alone
    for name, res in results["tasks"].items():
        for metric, value in res["metrics"].items():
            history = client.get_metric_history(run_id, f"downstream/{name}/{metric}")
            assert [(m.step, m.value) for m in history] == [(2, pytest.approx(value))], f"{name}/{metric}"
    artifacts = {a.path for a in client.list_artifacts(run_id, "downstream/step_2")}
    assert artifacts == {"downstream/step_2/eval_results.json", "downstream/step_2/accuracy.png"}


def test_cli_without_a_training_run_id_creates_an_eval_run(trained, tmp_path):
    from mlflow import MlflowClient

    (trained / "mlflow_run_id").rename(tmp_path / "saved_run_id")
    try:
        step_dir = trained / "checkpoints" / "step_2"
        assert main(["--checkpoint", str(step_dir), "--tasks", "piqa", "--limit", "2", "--no-progress"]) == 0
    finally:
        (tmp_path / "saved_run_id").rename(trained / "mlflow_run_id")
    client = MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlflow.db'}")
    runs = client.search_runs(
        [r.experiment_id for r in client.search_experiments()], "attributes.run_name = 'eval-run'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "downstream/piqa/acc_norm")] == [2]
    assert runs[0].data.tags["model_type"] == "hybrid-attention+fm+mamba2"


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--no-progress"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
