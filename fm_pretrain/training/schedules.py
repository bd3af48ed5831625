"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay (WSD) or constant.

`lr_at` is the single source of truth; `build_scheduler` wraps it in a LambdaLR so DeepSpeed can step and
checkpoint it. The lambda is a closure (not a callable object) on purpose: LambdaLR then stores no schedule
parameters in its state_dict, so a resumed run follows the schedule of its *current* config, and the
state_dict holds only plain numbers (loadable with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import math

import torch

from fm_pretrain.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps."""
    if step < cfg.warmup_steps:
        # (step + 1): the very first update already uses a non-zero lr.
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = total_steps - cfg.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        # The decay phase never starts before warmup ends, even for short runs.
        decay_start = max(cfg.warmup_steps, total_steps - round(cfg.decay_fraction * total_steps))
        if step < decay_start:
            return cfg.lr
        span = total_steps - decay_start
        progress = 1.0 if span <= 0 else min(1.0, (step - decay_start) / span)
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    raise ValueError(f"optim.schedule: unknown schedule '{cfg.schedule}'")


class _LambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that re-applies the restored step's lr on load.

    Plain LambdaLR restores only its counter, so the optimizer keeps whatever lr it had (e.g. the warmup lr
    set at construction) until the next step(), whatever order optimizer and scheduler states are loaded in.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, fn in zip(self.optimizer.param_groups, self.lr_lambdas):
            group["lr"] = group["initial_lr"] * fn(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose lr equals `lr_at(step)`; the optimizer must have been built with lr=cfg.lr."""
    for group in optimizer.param_groups:
        # LambdaLR multiplies each group's initial lr; a different base would silently rescale the schedule.
        base = group.get("initial_lr", group["lr"])
        if not math.isclose(base, cfg.lr, rel_tol=1e-6, abs_tol=0.0):
            raise ValueError(f"optimizer lr {base} != optim.lr {cfg.lr}; build the optimizer with lr=cfg.lr")

    def multiplier(step: int) -> float:
        return lr_at(step, cfg, total_steps) / cfg.lr if cfg.lr > 0 else 0.0

    return _LambdaLR(optimizer, multiplier)
