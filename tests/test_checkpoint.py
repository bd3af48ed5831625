"""Checkpoint bookkeeping without training: the atomic `latest` pointer, pruning, which checkpoint a run resumes
from (and when that is an error), RNG states, the loss guard and the stop-signal flag.

The multi-rank behaviour (kills, resharding, skipped steps) is in tests/test_fault_tolerance.py.
"""

import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fm_pretrain.config import ConfigError, load_config
from fm_pretrain.training.checkpoint import (
    META_FILE,
    find_resume,
    latest_tag,
    prune,
    rng_state,
    set_rng_state,
    write_latest,
)
from fm_pretrain.training.guards import guarded_loss
from fm_pretrain.training.signals import StopRequest
from tests.conftest import REPO


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


def test_guarded_loss_passes_finite_losses_and_poisons_every_gradient_otherwise():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    loss = lin(x).pow(2).mean()
    assert guarded_loss(loss, step=1, rank=0, inject=set()) is loss
    # An overflowed loss whose gradients would be finite (loss + inf): still every gradient becomes NaN,
    # so DeepSpeed's overflow check drops the whole update.
    guarded_loss(lin(x).pow(2).mean() + float("inf"), step=1, rank=0, inject=set()).backward()
    assert all(torch.isnan(p.grad).all() for p in lin.parameters())
    lin.zero_grad()
    injected = guarded_loss(lin(x).pow(2).mean(), step=4, rank=0, inject={4})
    injected.backward()
    assert not torch.isfinite(injected) and all(torch.isnan(p.grad).all() for p in lin.parameters())
    assert guarded_loss(loss, step=4, rank=1, inject={4}) is loss  # the hook fires on rank 0 only


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
