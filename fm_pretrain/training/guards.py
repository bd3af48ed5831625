"""Failure guards for the training loop: non-finite steps are skipped and counted; too many in a row stop the run.

Skipping relies on DeepSpeed's overflow check (ZeRO 1-3 in fp32, bf16 with `check_grad_overflow`, on by
default): when any rank's gradients hold inf/NaN, every rank drops the update (parameters, optimizer state and LR
schedule untouched) and `engine.skipped_steps` grows. A non-finite loss is turned into NaN gradients on purpose
(`poison`), so that a loss which overflowed without breaking the gradients is skipped too.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

# Test hooks: comma-separated global steps (1-based) whose rank-0 loss is multiplied by inf; seconds to sleep
# after each step (so that a test can interrupt a tiny, fast run at a step of its choice).
NONFINITE_ENV = "FM_PRETRAIN_TEST_NONFINITE_AT_STEPS"
STEP_DELAY_ENV = "FM_PRETRAIN_TEST_STEP_DELAY_S"
NONFINITE_EXIT_CODE = 3


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run cannot make progress."""


def injected_nonfinite_steps() -> set[int]:
    raw = os.environ.get(NONFINITE_ENV, "").strip()
    return {int(s) for s in raw.split(",") if s.strip()} if raw else set()


def delay_step_for_tests() -> None:
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def guarded_loss(loss: torch.Tensor, step: int, rank: int, inject: set[int]) -> torch.Tensor:
    """The loss to back-propagate: unchanged when finite, else one whose gradients are all NaN."""
    if rank == 0 and step in inject:
        loss = loss * float("inf")
    if bool(torch.isfinite(loss.detach())):
        return loss
    return loss * float("nan")  # poison every gradient, so DeepSpeed's overflow check skips the step


class NonFiniteGuard:
    """Counts skipped steps from DeepSpeed's `skipped_steps` and stops after `max_consecutive` in a row.

    `max_consecutive <= 0` disables the stop (the steps are still skipped and counted).
    """

    def __init__(self, engine, max_consecutive: int, zero_stage: int) -> None:
        if zero_stage == 0:
            log.warning("ZeRO-0 does not check gradients for inf/NaN: a non-finite step cannot be skipped there")
        self.engine = engine
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._seen = int(engine.skipped_steps)

    def after_step(self, step: int, loss: float) -> bool:
        """Call after the optimizer step; returns True if this step was skipped. Raises NonFiniteError."""
        now = int(self.engine.skipped_steps)
        skipped = now > self._seen
        self._seen = now
        if not skipped:
            self.consecutive = 0
            return False
        self.total += 1
        self.consecutive += 1
        log.warning(
            "step %d: non-finite loss or gradient (loss %s), update skipped (%d in a row, %d in all)",
            step,
            loss,
            self.consecutive,
            self.total,
        )
        if 0 < self.max_consecutive <= self.consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive non-finite steps (train.max_consecutive_nonfinite="
                f"{self.max_consecutive}), the last at step {step}; stopping"
            )
        return True
