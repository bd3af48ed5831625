"""Checkpoint bookkeeping without training: the atomic `latest` pointer, pruning, which checkpoint a run resumes
from (and when that is an error), RNG states, the loss guard, the stop-signal flag, the data identity a checkpoint
records (and what changes it) and the rewind of metrics.jsonl on resume.

The multi-rank behaviour (kills, resharding, skipped steps) is in tests/training/test_fault_tolerance.py.
"""

import copy
import json
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fm_pretrain.checkpoint import (
    META_FILE,
    CheckpointLayout,
    find_resume,
    latest_tag,
    load_checkpoint,
    prune,
    resolve_step_dir,
    rng_state,
    set_rng_state,
    write_latest,
)
from fm_pretrain.config import ConfigError, load_config
from fm_pretrain.data import DataError
from fm_pretrain.data.blend import BlendedDataset, BlendSampler
from fm_pretrain.data.identity import (
    DataChangedError,
    check_data_identity,
    data_identity,
    differences,
    packed_fingerprint,
)
from fm_pretrain.data.packed import GlobalSampler, PackedDataset
from fm_pretrain.testing import faults
from fm_pretrain.tracking.jsonl import truncate_metrics
from fm_pretrain.training.guards import SkipNonFiniteAdamW, poison_nonfinite
from fm_pretrain.training.signals import StopRequest
from tests.helpers.paths import REPO


def make_tags(ckpt, steps, meta=True):
    for s in steps:
        (ckpt / f"step_{s}").mkdir(parents=True)
        if meta:
            (ckpt / f"step_{s}" / META_FILE).write_text("{}")


def test_latest_is_replaced_atomically(tmp_path):
    make_tags(tmp_path, [1, 2])
    write_latest(tmp_path, "step_1")
    write_latest(tmp_path, "step_2")
    assert (tmp_path / "latest").read_text() == "step_2"
    assert latest_tag(tmp_path) == "step_2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1", "step_2"]  # no temporary file left


def test_latest_naming_a_missing_directory_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step_7")
    with pytest.raises(FileNotFoundError, match="names checkpoint 'step_7'"):
        latest_tag(tmp_path)


def test_prune_keeps_the_newest_the_latest_and_removes_interrupted_saves(tmp_path):
    make_tags(tmp_path, [1, 2, 3, 4, 10])
    (tmp_path / "step_11.tmp").mkdir()
    write_latest(tmp_path, "step_2")  # e.g. a resume from an older checkpoint
    removed = prune(tmp_path, keep_last=2)
    assert sorted(removed) == ["step_1", "step_11.tmp", "step_3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_10", "step_2", "step_4"]


def test_find_resume(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert find_resume(ckpt, resume=True, resume_from=None) is None  # nothing yet: a fresh start
    make_tags(ckpt, [3, 5])
    with pytest.raises(FileNotFoundError, match="no 'latest' pointer"):
        find_resume(ckpt, resume=True, resume_from=None)  # checkpoints exist: never silently start over
    assert find_resume(ckpt, resume=False, resume_from=None) is None
    write_latest(ckpt, "step_5")
    assert find_resume(ckpt, resume=True, resume_from=None) == ckpt / "step_5"
    assert find_resume(ckpt, resume=False, resume_from=str(ckpt / "step_3")) == ckpt / "step_3"
    assert find_resume(tmp_path / "other", resume=True, resume_from=str(ckpt)) == ckpt / "step_5"
    missing = tmp_path / "nope" / "step_9"
    with pytest.raises(FileNotFoundError, match=f"train.resume_from: no checkpoint at {missing}"):
        find_resume(ckpt, resume=True, resume_from=str(missing))
    (ckpt / "step_7").mkdir()  # a directory without meta.json is not a checkpoint of ours
    with pytest.raises(FileNotFoundError, match="step_7"):
        find_resume(ckpt, resume=True, resume_from=str(ckpt / "step_7"))


def test_resolve_step_dir_follows_latest_of_a_checkpoints_or_run_directory(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    make_tags(ckpt, [3, 5])
    write_latest(ckpt, "step_3")
    assert resolve_step_dir(ckpt / "step_5") == ckpt / "step_5"  # a step directory as given
    assert resolve_step_dir(ckpt) == ckpt / "step_3"
    assert resolve_step_dir(tmp_path / "run") == ckpt / "step_3"
    assert find_resume(ckpt, resume=False, resume_from=str(tmp_path / "run")) == ckpt / "step_3"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_step_dir(tmp_path)


def test_rng_states_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_fault_tolerance_options_are_validated():
    cfg = load_config(REPO / "configs" / "demo_tiny.yaml", ["train.resume_from=/x/step_3"])
    assert cfg.train.resume_from == "/x/step_3" and cfg.train.max_consecutive_nonfinite == 5
    with pytest.raises(ConfigError, match="train.max_consecutive_nonfinite"):
        load_config(REPO / "configs" / "demo_tiny.yaml", ["train.max_consecutive_nonfinite=-1"])
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        load_config(REPO / "configs" / "demo_tiny.yaml", ["train.collective_timeout_s=0"])


def test_poisoned_loss_passes_finite_losses_and_poisons_every_gradient_otherwise(monkeypatch):
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    lin(x).pow(2).mean().backward()
    plain = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    loss = lin(x).pow(2).mean()
    guarded = poison_nonfinite(loss)
    guarded.backward()
    assert torch.equal(guarded, loss)  # a finite loss: the same value and bit-identical gradients
    assert all(torch.equal(p.grad, g) for p, g in zip(lin.parameters(), plain, strict=True))
    lin.zero_grad()
    # An overflowed loss whose gradients would be finite (loss + inf): still every gradient becomes NaN,
    # so the overflow check drops the whole update.
    poison_nonfinite(lin(x).pow(2).mean() + float("inf")).backward()
    assert all(torch.isnan(p.grad).all() for p in lin.parameters())
    lin.zero_grad()
    monkeypatch.setenv(faults.ENV_VAR, faults.fault_env(nonfinite_loss=[4])[faults.ENV_VAR])
    faults.active.cache_clear()  # the environment is read once per process: re-read it for this test
    try:
        injected = poison_nonfinite(faults.on_loss(lin(x).pow(2).mean(), step=4, rank=0))
        injected.backward()
        assert not torch.isfinite(injected) and all(torch.isnan(p.grad).all() for p in lin.parameters())
        assert faults.on_loss(loss, step=4, rank=1) is loss  # the hook fires on rank 0 only
        assert faults.on_loss(loss, step=3, rank=0) is loss
    finally:
        monkeypatch.delenv(faults.ENV_VAR)
        faults.active.cache_clear()


def test_zero0_optimizer_skips_a_non_finite_update_and_matches_adamw_otherwise():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    opt_b = SkipNonFiniteAdamW(b.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    for net, opt in ((a, opt_a), (b, opt_b)):
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not opt_b.overflow and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    before = {k: v.clone() for k, v in b.state_dict().items()}
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt_b.state.items()}
    poison_nonfinite(b(x).pow(2).mean() + float("inf")).backward()
    opt_b.step()
    assert opt_b.overflow  # DeepSpeed's engine reads this: counts a skipped step and holds the LR schedule
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    assert all(torch.equal(t, state_before[k][n]) for k, v in opt_b.state.items() for n, t in v.items())


def test_stop_request_sets_a_flag_and_ranks_agree():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    stop = StopRequest()
    try:
        assert not stop.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
        assert stop.agreed(torch.device("cpu"))
    finally:
        stop.restore()
        dist.destroy_process_group()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate_metrics(path, 3) == 0 and not path.exists()  # nothing logged yet: nothing created
    lines = [json.dumps({"step": s, "train/loss": 1.0 / (s + 1)}) for s in range(6)]
    lines.insert(3, json.dumps({"step": 2, "val/loss": 0.5}))  # two lines of one step (train, then validation)
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "train/lo')  # killed while appending step 6
    assert truncate_metrics(path, 2) == 4  # steps 3, 4, 5 and the torn line
    assert path.read_text() == "\n".join(lines[:4]) + "\n"  # the kept lines, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    before = path.stat().st_mtime_ns
    assert truncate_metrics(path, 2) == 0 and path.stat().st_mtime_ns == before  # a clean file is not rewritten


@pytest.fixture(scope="module")
def train_split(packed):
    return PackedDataset(packed / "packed", "train", 64)


def test_data_identity_changes_with_what_orders_the_samples(packed, train_split):
    ds = train_split
    base = data_identity(ds, GlobalSampler(len(ds), seed=42))
    assert base["sampler"] == "global" and base["seq_len"] == 64 and base["seed"] == 42
    assert base["sources"][0]["fingerprint"] == packed_fingerprint(ds.meta, "train")
    assert differences(base, data_identity(ds, GlobalSampler(len(ds), seed=42))) == []
    moved = copy.deepcopy(base)
    moved["sources"][0]["path"] = "/elsewhere/packed"
    assert differences(base, moved) == []  # the same data at another path

    short = PackedDataset(packed / "packed", "train", 32)
    assert [d.split(":")[0] for d in differences(base, data_identity(short, GlobalSampler(len(short), 42)))] == [
        "seq_len"
    ]
    assert [d.split(":")[0] for d in differences(base, data_identity(ds, GlobalSampler(len(ds), 7)))] == ["seed"]
    one = data_identity(BlendedDataset([ds]), BlendSampler([len(ds)], [1.0], 42))
    assert [d.split(":")[0] for d in differences(base, one)] == ["sampler"]  # a blend orders samples differently

    def blend(weights: list[float]) -> dict:
        return data_identity(BlendedDataset([ds, ds]), BlendSampler([len(ds)] * 2, weights, 42))

    assert differences(blend([1.0, 3.0]), blend([3.0, 9.0])) == []  # weights count normalized
    assert [d.split(":")[0] for d in differences(blend([1.0, 3.0]), blend([1.0, 1.0]))] == [
        "sources[0].weight",
        "sources[1].weight",
    ]
    assert differences(base, blend([1.0, 3.0])) == [
        "sampler: 'global' -> 'blend'",
        f"sources: 1 -> 2 (paths {[str(ds.data_dir)]} -> {[str(ds.data_dir)] * 2})",
    ]
    # Repacked data: other shard sizes, or other input files, give another fingerprint.
    for change in ("shards", "sources"):
        meta = copy.deepcopy(ds.meta)
        if change == "shards":
            meta["splits"]["train"]["shards"][0]["docs"] += 1
        else:
            meta["sources"][0]["sha256"] = "0" * 64
        assert packed_fingerprint(meta, "train") != packed_fingerprint(ds.meta, "train"), change
    assert packed_fingerprint(ds.meta, "valid") != packed_fingerprint(ds.meta, "train")


def test_a_data_change_on_resume_is_an_error_unless_allowed(train_split, caplog):
    ds = train_split
    saved = data_identity(ds, GlobalSampler(len(ds), seed=42))
    now = data_identity(ds, GlobalSampler(len(ds), seed=43))
    meta = {"step": 30, "consumed_samples": 120, "data": saved}
    check_data_identity(meta, saved, allow_change=False, where="ck/meta.json")  # unchanged: nothing to say
    with pytest.raises(DataChangedError, match=r"ck/meta.json: .*seed: 42 -> 43\. Set train.allow_data_change=true"):
        check_data_identity(meta, now, allow_change=False, where="ck/meta.json")
    with caplog.at_level(logging.WARNING, logger="fm_pretrain.data.identity"):
        check_data_identity(meta, now, allow_change=True, where="ck/meta.json")
        check_data_identity({"step": 30}, now, allow_change=False, where="old/meta.json")  # written before the record
    assert "data changed (train.allow_data_change=true), continuing from sample 120" in caplog.text
    assert "old/meta.json records no data identity" in caplog.text
    cfg = load_config(REPO / "configs" / "demo_tiny.yaml", ["train.allow_data_change=true"])
    assert cfg.train.allow_data_change is True
    with pytest.raises(ConfigError, match="train.allow_data_change"):
        load_config(REPO / "configs" / "demo_tiny.yaml", ["train.allow_data_change=maybe"])


def test_resuming_with_another_tokenizer_is_a_data_error_naming_the_file(tmp_path):
    """A DataError, so train.py prints one line and exits 2; checked before anything is loaded."""
    tag_dir = tmp_path / "step_5"
    tag_dir.mkdir()
    (tag_dir / META_FILE).write_text(json.dumps({"step": 5, "tokenizer_sha256": "a" * 64}))
    with pytest.raises(DataError, match=r"step_5/meta.json: tokenizer_sha256 aaaaaaaaaaaa\.\.\. differs"):
        load_checkpoint(None, tag_dir, CheckpointLayout(dp=1, zero_stage=1, tp=1), "b" * 64)
