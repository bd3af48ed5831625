"""Evaluation split across data-parallel ranks: each rank scores whole batches, and the results are gathered.

Batches are formed exactly as on one rank (the same items in the same padded tensors) and batch j goes to rank
j % world, so every item's score is computed by the same arithmetic whatever the number of ranks: the scores are
identical to a one-rank run, not merely close. `Shard.merge` all-gathers each rank's {item index: result} (any
picklable result), so every rank ends with all of them and computes the same metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: rank r of `world` owns batches r, r + world, r + 2 world, ..."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank {self.rank} of {self.world}")

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def merge(self, part: dict[int, T]) -> dict[int, T]:
        """Every rank's {index: result}, united (an all-gather over the default process group)."""
        if self.world == 1:
            return part
        parts: list[dict[int, T] | None] = [None] * self.world
        dist.all_gather_object(parts, part)
        merged: dict[int, T] = {}
        for p in parts:
            merged.update(p or {})
        return merged


def data_parallel_shard() -> Shard:
    """The shard of this process in the default process group (one rank, all the work, when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()
