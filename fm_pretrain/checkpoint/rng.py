"""Random-number-generator states: every rank saves its own into `rng_rank<R>.pt` and restores it on resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .format import rng_file


def rng_state() -> dict[str, Any]:
    """python / numpy / torch (/ cuda) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def set_rng_state_from_seed(seed: int) -> None:
    """Seed every generator from one integer (a rank without a saved state: another world size)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_rng(tag_dir: Path, rank: int) -> None:
    torch.save(rng_state(), rng_file(tag_dir, rank))


def restore_rng(tag_dir: Path, rank: int, same_world: bool, seed: int, step: int) -> bool:
    """This rank's saved states when the checkpoint was written by as many ranks (True), else every generator
    seeded from (seed, step, rank), deterministically (False)."""
    path = rng_file(tag_dir, rank)
    if same_world and path.is_file():
        set_rng_state(torch.load(path, weights_only=False))
        return True
    set_rng_state_from_seed(seed + 1000003 * step + rank)
    return False
