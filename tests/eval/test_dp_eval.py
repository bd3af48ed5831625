"""Downstream evaluation split over 2 real gloo ranks (`torchrun -m fm_pretrain.eval`) gives the per-item scores of
one process, exactly: each rank scores whole batches of the one-rank split (eval/dp.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.eval.cli import main
from fm_pretrain.eval.dp import Shard
from tests.helpers.paths import REPO
from tests.inference.tiny_models import tiny_config, tiny_lm, write_checkpoint

pytestmark = pytest.mark.slow
TASKS = "boolq,lambada_openai,jsquad,xwinograd_jp"  # choice, last word, generation, partial scoring


def test_batches_go_round_robin():
    assert [j for j in range(7) if Shard(1, 3).owns(j)] == [1, 4]
    assert Shard().merge({2: "a"}) == {2: "a"}
    with pytest.raises(ValueError, match="rank"):
        Shard(2, 2)


def test_two_gloo_ranks_give_the_per_item_scores_of_one(packed, tmp_path):
    tok = Tokenizer(packed / "tokenizer.model")
    model = tiny_lm("hybrid", vocab=tok.vocab_size)
    step_dir = write_checkpoint(model, tiny_config("hybrid", tok.vocab_size, tok.path), tmp_path / "run", step=1)
    argv = ["--checkpoint", str(step_dir), "--tasks", TASKS, "--limit", "5", "--batch-size", "2", "--device", "cpu"]
    argv += ["--max-new-tokens", "4", "--per-item", "--no-mlflow", "--no-progress"]
    assert main(argv) == 0
    one = json.loads((step_dir / "eval_results.json").read_text())
    shutil.move(step_dir / "eval_results.json", tmp_path / "one_rank.json")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "fm_pretrain.eval", *argv]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data parallel: 2 ranks split the items" in done.stdout
    two = json.loads((step_dir / "eval_results.json").read_text())
    assert list(two["tasks"]) == TASKS.split(",")
    for name, res in one["tasks"].items():
        assert res["counts"]["scored"] == 5, name
        assert two["tasks"][name]["per_item"] == res["per_item"], name  # every item's score, exactly
        assert two["tasks"][name]["metrics"] == res["metrics"] and two["tasks"][name]["counts"] == res["counts"]
