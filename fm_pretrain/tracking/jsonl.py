"""run_dir/metrics.jsonl: one JSON line per logged step ({"step": N, "train/loss": ...}), readable without MLflow.

Only rank 0 writes it. It is appended to while training; on resume from the checkpoint of step S, the lines of
steps after S (logged before the interruption, about to be replayed) are dropped first, so the file stays one
clean history: every step once, with the values of the run that the checkpoints continue.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def append_metrics(path: Path, step: int, metrics: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the lines of steps <= `step`, rewriting the file atomically; returns how many lines were dropped.

    A line that is not a complete JSON object with a "step" (the torn last line of a process killed while
    appending) is dropped too. A crash during the rewrite leaves the old file (temporary file + os.replace).
    """
    if not path.is_file():
        return 0
    kept, dropped, torn = [], 0, 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, TypeError, KeyError):  # a torn or foreign line: not part of the history
            torn += 1
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if not dropped and not torn:
        return 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("%s: resuming at step %d, dropped %d lines of later steps and %d torn lines", path, step, dropped, torn)
    return dropped + torn
