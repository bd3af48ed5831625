"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary and a clean exit (code 0).

A signal may reach only some ranks (Slurm signals one task, `kill` one pid): each rank records it in a flag,
and the ranks agree every step through one all-reduce (MAX), so all of them stop after the same step.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, enabled: bool = True) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        if enabled:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: saving from inside a signal handler would interrupt DeepSpeed mid-collective.
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank received a stop signal (a collective: all ranks call it each step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
