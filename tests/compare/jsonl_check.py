"""Checks a comparison table row against the run's own metrics.jsonl (the trainer's record of every logged step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check_row_against_jsonl(row: dict, run_dir: Path, seq_len: int) -> None:
    """Final and best validation loss and tokens seen, as the table has them, from metrics.jsonl."""
    rows = jsonl_rows(run_dir)
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}  # one line per step (the file has no replays)
    assert val, f"{run_dir}: no val/loss in metrics.jsonl"
    assert row["val_loss_final"] == pytest.approx(val[max(val)], rel=1e-12)
    assert row["val_loss_best"] == pytest.approx(min(val.values()), rel=1e-12)
    tokens = [r["train/tokens"] for r in rows if "train/tokens" in r]
    if not tokens:  # a trainer without train/tokens: consumed samples x seq_len
        tokens = [r["train/consumed_samples"] * seq_len for r in rows if "train/consumed_samples" in r]
    assert row["tokens"] == pytest.approx(tokens[-1], rel=1e-12)
