import io
import math

import pytest
import torch

from fm_pretrain.config import OptimConfig
from fm_pretrain.training.schedules import build_scheduler, lr_at

TOTAL = 1000


def _cfg(**kw) -> OptimConfig:
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_fraction=0.2)
    base.update(kw)
    return OptimConfig(**base)


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_endpoints(schedule):
    cfg = _cfg(schedule=schedule)
    assert lr_at(0, cfg, TOTAL) == pytest.approx(cfg.lr / 100)
    assert lr_at(49, cfg, TOTAL) == pytest.approx(cfg.lr * 0.5)
    assert lr_at(99, cfg, TOTAL) == pytest.approx(cfg.lr)
    assert lr_at(100, cfg, TOTAL) == pytest.approx(cfg.lr)
    warm = [lr_at(s, cfg, TOTAL) for s in range(100)]
    assert all(a < b for a, b in zip(warm, warm[1:]))


def test_no_warmup_starts_at_peak():
    cfg = _cfg(warmup_steps=0)
    assert lr_at(0, cfg, TOTAL) == pytest.approx(cfg.lr)


def test_cosine_midpoint_and_end():
    cfg = _cfg(schedule="cosine")
    mid = 100 + (TOTAL - 100) // 2  # 550: exactly half way through the decay span of 900 steps
    assert lr_at(mid, cfg, TOTAL) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    quarter = 100 + 225
    expected = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi / 4))
    assert lr_at(quarter, cfg, TOTAL) == pytest.approx(expected)
    assert lr_at(TOTAL, cfg, TOTAL) == pytest.approx(cfg.min_lr)
    assert lr_at(TOTAL + 500, cfg, TOTAL) == pytest.approx(cfg.min_lr)  # clamped past the end
    decay = [lr_at(s, cfg, TOTAL) for s in range(100, TOTAL + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_wsd_plateau_and_decay():
    cfg = _cfg(schedule="wsd")
    decay_start = TOTAL - 200
    for s in (100, 500, decay_start - 1, decay_start):
        assert lr_at(s, cfg, TOTAL) == pytest.approx(cfg.lr)
    assert lr_at(decay_start + 100, cfg, TOTAL) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    assert lr_at(TOTAL, cfg, TOTAL) == pytest.approx(cfg.min_lr)
    assert lr_at(TOTAL + 10, cfg, TOTAL) == pytest.approx(cfg.min_lr)


def test_wsd_decay_never_overlaps_warmup():
    cfg = _cfg(schedule="wsd", warmup_steps=100, decay_fraction=1.0)
    assert lr_at(99, cfg, 200) == pytest.approx(cfg.lr)
    assert lr_at(100, cfg, 200) == pytest.approx(cfg.lr)
    assert lr_at(200, cfg, 200) == pytest.approx(cfg.min_lr)


def test_constant_after_warmup():
    cfg = _cfg(schedule="constant")
    assert lr_at(500, cfg, TOTAL) == cfg.lr
    assert lr_at(5 * TOTAL, cfg, TOTAL) == cfg.lr


def test_short_run_shorter_than_warmup():
    cfg = _cfg(schedule="cosine", warmup_steps=100)
    assert lr_at(150, cfg, 50) == pytest.approx(cfg.min_lr)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_scheduler_matches_lr_at(schedule):
    cfg = _cfg(schedule=schedule, warmup_steps=10)
    total = 60
    opt = _optimizer(cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    for step in range(total + 5):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg, total), rel=1e-12)
        opt.step()
        sched.step()


def test_scheduler_rejects_mismatched_optimizer_lr():
    with pytest.raises(ValueError, match="optim.lr"):
        build_scheduler(_optimizer(0.1), _cfg(), TOTAL)


@pytest.mark.parametrize("optimizer_first", [True, False])
def test_state_dict_round_trip_continues_identically(optimizer_first):
    cfg = _cfg(schedule="cosine", warmup_steps=10)
    total = 50
    opt = _optimizer(cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    for _ in range(23):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain numbers only: safe loading works

    # Either load order must leave the optimizer at the restored step's lr (not the construction-time lr).
    opt2 = _optimizer(cfg.lr)
    if optimizer_first:
        opt2.load_state_dict(saved["opt"])
    sched2 = build_scheduler(opt2, cfg, total)
    sched2.load_state_dict(saved["sched"])
    if not optimizer_first:
        opt2.load_state_dict(saved["opt"])
    assert sched2.last_epoch == sched.last_epoch == 23
    for _ in range(total - 23 + 3):
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-12)
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
