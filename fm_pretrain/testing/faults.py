"""Fault injection: named hook points in the trainer, the checkpointer and the packer, inert unless asked for.

Tests ask for faults through one environment variable, read once per process (a spawned worker reads it
again in its own process), so production modules carry no environment plumbing of their own:

    FM_PRETRAIN_FAULTS="nonfinite_loss=2,4;step_delay_s=0.3;crash_in_save=2;kill_in_pack=6"

- `nonfinite_loss`: global steps (1-based) at which rank 0's loss is multiplied by inf;
- `step_delay_s`: seconds to sleep after every training step (so a test can interrupt a tiny run on time);
- `crash_in_save`: a step whose save rank 0 abandons with exit code 17, tag directory written but not renamed;
- `kill_in_pack`: a chunk number mid-way through which the packer SIGKILLs its process group.

`fault_env(...)` builds the variable for a subprocess; an unknown point or a malformed value is an error
naming it, so a typo in a test never silently injects nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the packer calls hooks too and does not import torch
    import torch

log = logging.getLogger(__name__)

ENV_VAR = "FM_PRETRAIN_FAULTS"
CRASH_EXIT_CODE = 17
POINTS = ("nonfinite_loss", "step_delay_s", "crash_in_save", "kill_in_pack")


@dataclass(frozen=True)
class Faults:
    nonfinite_loss: frozenset[int] = frozenset()
    step_delay_s: float = 0.0
    crash_in_save: int | None = None
    kill_in_pack: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Faults:
        values: dict = {}
        for item in filter(None, (part.strip() for part in spec.split(";"))):
            name, sep, raw = item.partition("=")
            name, raw = name.strip(), raw.strip()
            if name not in POINTS or not sep:
                raise ValueError(f"{ENV_VAR}: '{item}' is not one of {list(POINTS)} as name=value")
            try:
                if name == "nonfinite_loss":
                    values[name] = frozenset(int(s) for s in raw.split(",") if s.strip())
                elif name == "step_delay_s":
                    values[name] = float(raw)
                else:
                    values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{ENV_VAR}: bad value for {name}: {raw!r}") from None
        return cls(**values)


def fault_env(
    nonfinite_loss: list[int] | None = None,
    step_delay_s: float | None = None,
    crash_in_save: int | None = None,
    kill_in_pack: int | None = None,
) -> dict[str, str]:
    """{ENV_VAR: spec} for a subprocess's environment."""
    parts = []
    if nonfinite_loss:
        parts.append("nonfinite_loss=" + ",".join(str(s) for s in nonfinite_loss))
    if step_delay_s is not None:
        parts.append(f"step_delay_s={step_delay_s}")
    if crash_in_save is not None:
        parts.append(f"crash_in_save={crash_in_save}")
    if kill_in_pack is not None:
        parts.append(f"kill_in_pack={kill_in_pack}")
    return {ENV_VAR: ";".join(parts)}


@functools.cache
def active() -> Faults:
    """The faults this process was asked for (environment read once)."""
    return Faults.parse(os.environ.get(ENV_VAR, ""))


# ---- hook points (each a no-op unless its fault was asked for) ----


def on_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Trainer, before backward: rank 0's loss becomes non-finite at the chosen steps."""
    if rank == 0 and step in active().nonfinite_loss:
        return loss * float("inf")
    return loss


def after_step(step: int) -> None:
    """Trainer, after each step: sleep, so a test can interrupt a tiny run near a step of its choice."""
    if active().step_delay_s > 0:
        time.sleep(active().step_delay_s)


def in_save(step: int, rank: int) -> None:
    """Checkpointer, rank 0, between writing the temporary tag directory and renaming it."""
    if rank == 0 and active().crash_in_save == step:
        log.warning("fault injection: exiting in the middle of saving step %d", step)
        os._exit(CRASH_EXIT_CODE)


def in_pack_chunk(chunk: int) -> bool:
    """Packer: whether to crash mid-way through this chunk (the caller flushes, then calls `kill_process_group`)."""
    return active().kill_in_pack == chunk


def kill_process_group() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)
