"""Memory Caching's segmentation: which cached states a token reads.

Positions are counted from the token's document start (a new document starts with an empty cache). With unit U
(`segment_size`), a token at document position n lies in unit c = n // U; the units before it are cut into cached
segments, each ending at a unit boundary j U (1 <= j <= c), and the token's own unit is the online segment:

- constant: one segment per unit, boundaries j = 1, 2, ..., c (segment j covers [(j - 1) U, j U));
- log: the binary expansion of c, largest first: boundaries j = c with its low bits cleared, for every set bit of
  c (c = 13 = 8 + 4 + 1: boundaries 8, 12, 13, segments [0, 8U), [8U, 12U), [12U, 13U)): O(log c) segments.
  Segment j covers [(j - lowbit(j)) U, j U), whatever the token.

In `checkpoint` state mode segment j's cached state is the recurrent state at position j U (the whole prefix);
in `independent` mode it is the state of that segment alone, started from zero.

Decoding keeps only the states later tokens can still read, in slots (`cache_slot`):

- constant: every boundary, slot j - 1 (c states after c units);
- log: one slot per bit level, slot tz(j) (the number of trailing zero bits of j). A token in unit c reads the
  boundaries c with low bits cleared, one per set bit of c, each the most recently completed boundary of its level
  (a later one of that level is > c; an earlier one j' has j' + lowbit(j') <= that boundary <= c, so no token from
  now on reads it). A completed boundary therefore overwrites its level's slot, and after c units the cache holds
  bit_length(c) states: O(log L), not O(L / U).

The descriptor prefix sums at the boundaries follow the same slots, shifted by one (slot 0: the empty prefix).
"""

from __future__ import annotations

import torch

SEGMENTATIONS = ("constant", "log")


def lowbit(j: torch.Tensor) -> torch.Tensor:
    """The lowest set bit of each positive integer (j & -j)."""
    return j & -j


def segment_start(j: torch.Tensor, segmentation: str) -> torch.Tensor:
    """First unit of the segment that ends at boundary j (j >= 1)."""
    return j - 1 if segmentation == "constant" else j - lowbit(j)


def boundaries(c: torch.Tensor, segmentation: str, width: int) -> torch.Tensor:
    """c (...,) int64 units before each token -> (..., width) int64 boundaries of its cached segments in increasing
    order, 0 where there is none. width >= c.max() (constant) or >= popcount (log; bit_length(c.max()) suffices)."""
    if segmentation == "constant":
        j = torch.arange(1, width + 1, device=c.device)
        return torch.where(j <= c[..., None], j, torch.zeros_like(j))
    if segmentation != "log":
        raise ValueError(f"unknown segmentation '{segmentation}' (choose from {SEGMENTATIONS})")
    bits = torch.arange(width - 1, -1, -1, device=c.device)  # high bits first: increasing boundaries
    trunc = (c[..., None] >> bits) << bits
    has = ((c[..., None] >> bits) & 1).bool()
    return torch.where(has, trunc, torch.zeros_like(trunc))


def trailing_zeros(j: torch.Tensor) -> torch.Tensor:
    """tz(j) for positive int64 j (0 for j = 0, never used as a boundary)."""
    low = lowbit(j).clamp(min=1)
    return (torch.log2(low.double()) + 0.5).long()


def cache_slot(j: torch.Tensor, segmentation: str) -> torch.Tensor:
    """The decoding cache's slot of boundary j >= 1: j - 1 (constant) or its bit level tz(j) (log)."""
    return j - 1 if segmentation == "constant" else trailing_zeros(j)


def csum_slot(j: torch.Tensor, segmentation: str) -> torch.Tensor:
    """The slot of the descriptor prefix sum at boundary j >= 0 (0: the empty prefix)."""
    return torch.where(j > 0, cache_slot(j.clamp(min=1), segmentation) + 1, torch.zeros_like(j))


def n_slots(completed: int, segmentation: str) -> int:
    """Cache slots needed once `completed` boundaries of a document are complete."""
    return completed if segmentation == "constant" else int(completed).bit_length()


def stored_boundaries(completed: torch.Tensor, segmentation: str, slots: int) -> torch.Tensor:
    """completed (B,) boundaries completed -> (B, slots) the boundary held in each cache slot (0: none): constant
    j = slot + 1 <= completed; log the most recent boundary of level b = slot, the largest odd multiple of 2^b
    that is <= completed."""
    b = torch.arange(slots, device=completed.device)
    if segmentation == "constant":
        j = b[None, :] + 1
        return torch.where(j <= completed[:, None], j, torch.zeros_like(j))
    m = completed[:, None] >> b  # multiples of 2^b completed
    j = (((m - 1) >> 1 << 1) + 1) << b  # the largest odd m' <= m, times 2^b
    return torch.where(m >= 1, j, torch.zeros_like(j))


def width_for(max_units: int, segmentation: str) -> int:
    """The `width` of `boundaries` needed for c <= max_units."""
    return max(1, max_units if segmentation == "constant" else int(max_units).bit_length())


def segment_sizes(n: int, unit: int, segmentation: str) -> tuple[list[int], int]:
    """Host helper: (sizes of the cached segments, largest first for log, then the online segment's size) for the
    token at document position n."""
    c = n // unit
    js = [int(j) for j in boundaries(torch.tensor(c), segmentation, width_for(c, segmentation)).tolist() if j]
    starts = [int(segment_start(torch.tensor(j), segmentation)) for j in js]
    return [(j - s) * unit for j, s in zip(js, starts)], n - c * unit + 1
