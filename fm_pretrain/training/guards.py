"""Failure guards for the training loop: non-finite steps are skipped and counted; too many in a row stop the run.

Skipping relies on an overflow check before the update: DeepSpeed's own under ZeRO 1-3 (and bf16's
`check_grad_overflow`), and `SkipNonFiniteAdamW` under ZeRO-0, where DeepSpeed calls the client optimizer
directly and reads its `overflow` attribute. When any rank's gradients hold inf/NaN, every rank drops the update
(parameters, optimizer state and LR schedule untouched) and `engine.skipped_steps` grows.

A non-finite loss is turned into NaN gradients on purpose (`poison_nonfinite`), on the device and without a host
sync, so that a loss which overflowed without breaking the gradients is skipped too.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

NONFINITE_EXIT_CODE = 3


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run cannot make progress."""


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """The loss to back-propagate: the same value and gradients when finite, else all-NaN gradients.

    Decided on the device (a multiply by 1 or NaN), so the micro-step never waits for the host.
    """
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
    return loss * factor


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips its update when any gradient is non-finite on any rank, for ZeRO-0 (where DeepSpeed has
    no overflow check of its own): it sets `overflow`, which DeepSpeed's engine reads to count the skipped step
    and to leave the LR schedule where it is.

    One all-reduce of a flag and one host sync per optimizer step (not per micro-step), like ZeRO 1-3's check.
    """

    overflow: bool = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        bad = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # TP shards and DP replicas decide together
        self.overflow = bool(bad.item())  # host sync: once per optimizer step
        if self.overflow:
            return None
        return super().step(closure)


class NonFiniteGuard:
    """Counts skipped steps from DeepSpeed's `skipped_steps` and stops after `max_consecutive` in a row.

    `max_consecutive <= 0` disables the stop (the steps are still skipped and counted).
    """

    def __init__(self, engine, max_consecutive: int) -> None:
        self.engine = engine
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._seen = int(engine.skipped_steps)

    def after_step(self, step: int) -> bool:
        """Call after the optimizer step; returns True if this step was skipped. Raises NonFiniteError."""
        now = int(self.engine.skipped_steps)  # a host-side counter: no device sync
        skipped = now > self._seen
        self._seen = now
        if not skipped:
            self.consecutive = 0
            return False
        self.total += 1
        self.consecutive += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
            step,
            self.consecutive,
            self.total,
        )
        if 0 < self.max_consecutive <= self.consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive non-finite steps (train.max_consecutive_nonfinite="
                f"{self.max_consecutive}), the last at step {step}; stopping"
            )
        return True
