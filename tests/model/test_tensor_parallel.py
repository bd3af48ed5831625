"""Tensor parallelism (megatron-core) against the TP = 1 model, with real processes on gloo.

- tests/helpers/tp_worker.py under torchrun at TP = 2 x DP = 1 (2 ranks) and TP = 2 x DP = 2 (4 ranks): initial weights,
  loss and full gradients (gathered from the shards, averaged over DP by DeepSpeed) of a hybrid FM-dense +
  attention (GQA) + Mamba-2 (2 B/C groups) model with a padded vocabulary, and of a sparse FM model (balancing
  loss, output gate, tied embeddings), and of the memory family (GLA, Gated DeltaNet, MoM, FM + Memory Caching),
  each with and without activation checkpointing, plus generation.
- fm_pretrain/train.py under torchrun: ZeRO-1/2/3 at TP = 2 follow the TP = 1 losses and grad norms with
  clipping active (ZeRO 1-3 at TP = 1 agree with each other in test_train_distributed.py).

Tolerances: everything runs in fp32 and only the order of reductions differs (partial sums all-reduced by the
row-parallel layers, the vocabulary-parallel softmax sums, DP averaging): measured differences are below
3e-6 of each gradient's scale and 5e-7 on the losses; a wrong shard or a missing all-reduce is an O(1) error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fm_pretrain.config import ConfigError, ParallelConfig, from_dict
from fm_pretrain.launch import train_env
from fm_pretrain.model import DecoderLM
from fm_pretrain.parallel.sharding import TPSplit, shard_tensor, unshard_tensor
from tests.helpers.paths import REPO
from tests.helpers.tp_worker import CASES, SEED, dp_slice, make_batch, model_config
from tests.helpers.train_runs import TINY_HYBRID, data_overrides, run_training

WORKER = REPO / "tests" / "helpers" / "tp_worker.py"
LOSS_TOL = dict(rtol=1e-6, atol=2e-6)
GRAD_REL = 2e-5  # of the largest |gradient| of each parameter


# ---- single process: sharding maps, checkpointing, config checks -------------------------------------------


def test_shard_and_unshard_are_inverse_with_segments_and_padding():
    full = torch.randn(16, 5)
    split = TPSplit(dim=0, segments=(4, 4, 2, 2, 4), full_len=14)  # 2 padding rows at the end of the last block
    with pytest.raises(ValueError, match="expected 14"):
        shard_tensor(full, split, 0, 2)
    full = full[:14]
    shards = [shard_tensor(full, split, r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [8, 8]
    # Rank 0 holds the first half of every block: rows 0-1, 4-5, 8, 10, 12-13.
    torch.testing.assert_close(shards[0], full[[0, 1, 4, 5, 8, 10, 12, 13]], rtol=0, atol=0)
    assert torch.equal(shards[1][-2:], torch.zeros(2, 5))  # rank 1's share of the last block is padding
    assert torch.equal(unshard_tensor(shards, split), full)
    cols = TPSplit(dim=1, segments=(6,), full_len=6)
    w = torch.randn(2, 6)
    assert torch.equal(unshard_tensor([shard_tensor(w, cols, r, 3) for r in range(3)], cols), w)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for ckpt in (False, True):
        torch.manual_seed(SEED)
        model = DecoderLM(model_config("hybrid_dense"), ParallelConfig(activation_checkpointing=ckpt))
        out = model(**make_batch("hybrid_dense"))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    assert torch.equal(loss0, loss1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_tp_model_without_process_groups_is_an_error():
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        DecoderLM(model_config("fm_sparse"), ParallelConfig(tensor_parallel=2))


@pytest.mark.parametrize(
    "model, key",
    [
        ({"layer_pattern": ["fm"], "fm": {"n_heads": 3}}, "model.fm.n_heads"),
        ({"layer_pattern": ["attention"], "attention": {"n_heads": 4, "n_kv_heads": 1}}, "model.attention.n_kv_heads"),
        ({"layer_pattern": ["mamba2"], "d_model": 96, "mamba2": {"head_dim": 64}}, "model.mamba2.head_dim"),
        ({"layer_pattern": ["mamba2"], "mamba2": {"n_groups": 1}}, "model.mamba2.n_groups"),
        ({"layer_pattern": ["fm"], "mlp_hidden": 99, "fm": {"n_heads": 4}}, "model.mlp_hidden"),
    ],
)
def test_config_rejects_uneven_tensor_parallel_splits(model, key):
    with pytest.raises(ConfigError, match=f"{key}: .*not divisible by parallel.tensor_parallel=2"):
        from_dict({"model": model, "parallel": {"tensor_parallel": 2}})
    from_dict({"model": model, "parallel": {"tensor_parallel": 1}})  # fine without TP


def test_config_rejects_tensor_parallel_below_one():
    with pytest.raises(ConfigError, match="parallel.tensor_parallel: must be >= 1"):
        from_dict({"parallel": {"tensor_parallel": 0}})


# ---- real ranks: tests/helpers/tp_worker.py ------------------------------------------------------------------------


def run_worker(nproc: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), "--tp", "2", "--out", str(out)]  # fmt: skip
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=train_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{log.read_text()[-4000:]}"
    return torch.load(out / "results.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, dp", [(2, 1), (4, 2)], ids=["tp2xdp1", "tp2xdp2"])
def test_tp2_reproduces_tp1_losses_and_gradients(tmp_path, nproc, dp):
    saved = run_worker(nproc, tmp_path / "out")
    assert saved["layout"]["tp"] == 2 and saved["layout"]["dp"] == dp
    results = saved["results"]
    assert sorted(results) == sorted(f"{name}/ckpt={c}" for name in CASES for c in (False, True))
    for key, got in results.items():
        name = key.split("/")[0]
        torch.manual_seed(SEED)
        ref = DecoderLM(model_config(name))
        batch = make_batch(name)
        want = torch.zeros(2)
        for d in range(dp):  # data parallel: the mean over DP ranks of each rank's loss and gradients
            out = ref(**dp_slice(batch, d, dp))
            (out.loss / dp).backward()
            want += torch.stack([out.loss.detach(), out.lm_loss.detach()]) / dp
        params = dict(ref.named_parameters())
        assert sorted(got["grads"]) == sorted(params), key
        assert got["num_params"] == ref.num_params(), key  # counts the full model, not one rank's shards
        for n, p in params.items():
            assert torch.equal(got["init"][n], p.detach()), f"{key}: initial {n} differs from the TP = 1 model"
        torch.testing.assert_close(got["loss"], want, **LOSS_TOL, msg=f"{key}: loss")
        for n, p in params.items():
            scale = float(p.grad.abs().max())
            assert scale > 0, f"{key}: {n} has no gradient at TP = 1"
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=0, atol=GRAD_REL * scale, msg=f"{key}: grad {n}")
        if "generated" in got:
            ref.eval()
            assert torch.equal(got["generated"], ref.generate(batch["input_ids"][:2, :5], max_new_tokens=4)), key


# ---- real ranks: fm_pretrain/train.py under ZeRO 1-3 ---------------------------------------------------------

SMALL = [
    *TINY_HYBRID,
    "model.fm.aux_loss_weight=0.01",
    "train.steps=4",
    "train.val_every=4",
    "train.save_every=100",
    "optim.grad_clip=0.05",  # far below the gradient norm (~1.4): every step is clipped
    "tracking.enabled=false",
]


def train(packed: Path, run_dir: Path, nproc: int, *overrides: str) -> list[dict]:
    return run_training(run_dir, [*data_overrides(packed), *SMALL, *overrides], nproc=nproc)


def series(rows: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in rows if key in r and r["step"] > 0], dtype=torch.float64)


@pytest.mark.slow
def test_zero_stages_at_tp2_follow_the_tp1_run(packed, tmp_path):
    # The same 8 sequences per step everywhere: micro-batch 2 x accumulation x DP size.
    ref = train(packed, tmp_path / "tp1_zero2", 2, "train.grad_accum=2", "train.ds_config=ds_configs/zero2.json")
    runs = {
        "tp2_dp1_zero1": train(packed, tmp_path / "tp2_dp1_zero1", 2, "parallel.tensor_parallel=2",
                               "train.grad_accum=4", "train.ds_config=ds_configs/zero1.json"),
        "tp2_dp2_zero2": train(packed, tmp_path / "tp2_dp2_zero2", 4, "parallel.tensor_parallel=2",
                               "train.grad_accum=2", "train.ds_config=ds_configs/zero2.json"),
        "tp2_dp2_zero3_ckpt": train(packed, tmp_path / "tp2_dp2_zero3", 4, "parallel.tensor_parallel=2",
                                    "parallel.activation_checkpointing=true",
                                    "train.grad_accum=2", "train.ds_config=ds_configs/zero3.json"),
    }  # fmt: skip
    want_loss, want_norm = series(ref, "train/loss"), series(ref, "train/grad_norm")
    assert len(want_loss) == 4 and want_loss[-1] < want_loss[0]
    assert (want_norm > 10 * 0.05).all(), "clipping was not active: the test would not see a wrong grad norm"
    for name, rows in runs.items():
        torch.testing.assert_close(series(rows, "train/loss"), want_loss, rtol=2e-6, atol=0, msg=f"{name}: loss")
        torch.testing.assert_close(series(rows, "train/grad_norm"), want_norm, rtol=1e-5, atol=0, msg=f"{name}: norm")
        if "dp2" in name:  # the validation set is val_batches micro-batches per DP rank: comparable at equal DP
            torch.testing.assert_close(series(rows, "val/loss"), series(ref, "val/loss"), rtol=2e-6, atol=0)
