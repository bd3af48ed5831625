"""Long-context loss: chunked per-position NLL equals one full forward (so loss-so-far and the buckets equal their
direct definitions), sequences are whole documents longest first, a 64K-token run stays within a stated memory
bound (measured), and the CLI writes the results, the plot and MLflow metrics."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.eval.long_context import (
    LongContextSettings,
    buckets,
    build_sequences,
    evaluate_long_context,
    is_japanese,
    loss_so_far,
    main,
    position_nll,
    position_nll_reference,
)
from tests.helpers.paths import REPO
from tests.inference.tiny_models import tiny_config, tiny_lm, write_checkpoint


@pytest.mark.parametrize("name", ["fm_sparse", "hybrid"])
def test_loss_so_far_equals_a_direct_per_position_nll(name):
    lm = tiny_lm(name)
    ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(0))
    direct = position_nll_reference(lm, ids)[0]  # one full forward
    for C in (1, 7, 16, 64):
        torch.testing.assert_close(position_nll(lm, ids, C)[0], direct, rtol=0, atol=2e-5)
    # loss-so-far at t is the mean of the first t NLLs, and the summary reports it at the full length
    sofar = loss_so_far(direct)
    for t in (1, 9, 49):
        torch.testing.assert_close(sofar[t - 1], direct[:t].mean())
    docs = [ids[0, :30].tolist(), ids[0, 30:].tolist()]  # longest first: the 30-token document leads
    res = evaluate_long_context(lm, None, {"en": docs}, LongContextSettings(50, 1, 8), progress=False)["languages"]
    assert res["en"]["length"] == 50 and res["en"]["loss_so_far"]["50"] == pytest.approx(float(direct.mean()), abs=1e-5)
    for b in res["en"]["buckets"]:  # [0, 128) clipped to the 49 predicted positions 1..49
        assert (b["lo"], b["hi"]) == (0, 50) and b["nll"] == pytest.approx(float(direct.mean()), abs=1e-5)


def test_sequences_are_whole_documents_longest_first():
    docs = [[2, 10, 3], [2, 20, 21, 22, 23, 3], [2, 30, 31, 3]]
    assert build_sequences(docs, 4, 3) == [[2, 20, 21, 22], [23, 3, 2, 30], [31, 3, 2, 10]]
    assert build_sequences(docs, 5, 9) == [[2, 20, 21, 22, 23], [3, 2, 30, 31, 3]]  # the rest (3 tokens) is dropped
    assert build_sequences(docs, 100, 2) == [[2, 20, 21, 22, 23, 3, 2, 30, 31, 3, 2, 10, 3]]  # all, shorter
    assert buckets(1000) == [(0, 128), (128, 256), (256, 512), (512, 1001)]
    assert is_japanese("日本語の文章です。") and not is_japanese("An English sentence, 一 word.")


# Peak RSS is read from /proc/self/status (VmHWM) after resetting it to the current RSS (clear_refs "5"), so the
# figure is the peak of this call alone: getrusage's ru_maxrss keeps the peak of the imports and model setup.
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from fm_pretrain.eval.long_context import position_nll
    from tests.inference.tiny_models import tiny_lm
    def status_kb(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
    torch.set_num_threads(1)
    lm = tiny_lm("fm_sparse", vocab=2000)
    T, C = int(sys.argv[1]), int(sys.argv[2])
    ids = torch.randint(0, 2000, (1, T), generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = status_kb("VmRSS")
    nll = position_nll(lm, ids, C)
    after = status_kb("VmHWM")
    print(json.dumps({"added_mb": (after - before) / 1024, "finite": bool(torch.isfinite(nll).all())}))
""")

MEMORY_BOUND_MB = 128  # docs/inference.md: what a 64K-token chunked run of this model may add to peak RSS


def test_a_64k_token_run_stays_within_its_memory_bound():
    """Peak RSS added by the NLL of 65,536 tokens in chunks of 1,024 (tiny FM sparse model, vocabulary 2,000), in a
    fresh process; the control, one 8,192-token forward, adds more (its logits alone are 64 MB)."""

    def added_mb(T: int, C: int) -> float:
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(T), str(C)], cwd=REPO, capture_output=True,
                             text=True, check=True, timeout=300)  # fmt: skip
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["finite"]
        return res["added_mb"]

    chunked = added_mb(65536, 1024)
    assert chunked < MEMORY_BOUND_MB, chunked
    assert added_mb(8192, 8192) > chunked


def test_cli_writes_results_plot_and_mlflow_metrics(packed, tmp_path, capsys):
    from mlflow import MlflowClient

    tok = Tokenizer(packed / "tokenizer.model")
    model = tiny_lm("fm_dense", vocab=tok.vocab_size)
    step_dir = write_checkpoint(model, tiny_config("fm_dense", tok.vocab_size, tok.path), tmp_path / "run", step=4)
    argv = ["--checkpoint", str(tmp_path / "run"), "--max-length", "600", "--chunk-size", "128", "--n-sequences", "2"]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "en: 2 x 600 tokens" in out and "ja: 2 x 600 tokens" in out
    res = json.loads((step_dir / "long_context" / "long_context.json").read_text())
    assert res["step"] == 4 and set(res["languages"]) == {"en", "ja"}
    assert list(res["languages"]["ja"]["loss_so_far"]) == ["600"]
    assert (step_dir / "long_context" / "long_context.png").stat().st_size > 10_000
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("inference-tests").experiment_id)
    value = run.data.metrics["long_context/ja/loss_so_far/600"]
    assert value == pytest.approx(res["languages"]["ja"]["loss_so_far"]["600"])
    assert "long_context/en/nll/512-600" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "long_context/step_4")}
    assert arts == {"long_context/step_4/long_context.json", "long_context/step_4/long_context.png"}
