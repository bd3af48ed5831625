"""The generation cache's contract, shared by every token mixer: one dict per layer, filled by the layer itself.

Batched prompts of different lengths are **left-padded** to a common length T: row b's prompt occupies positions
start[b] ... T - 1, so every row's next token is predicted at position T - 1 and decoding runs in lockstep.
Padding must never reach a real token, so each mixer treats a pad position as an identity step:

- FM: write weight theta = 0 (the state is neither decayed nor written) and xbar = 0;
- Mamba-2: dt = 0 (no decay, no input) and the convolution's input is 0 (a zero, as before a sequence start);
- attention: pad keys are masked out of every real query's scores, and RoPE positions count from start[b]
  (a pad query attends only to itself, so its output stays finite and is never read).

Keys every layer's dict may hold (`DecoderLM.new_caches` puts "start" into each):

| key | shape | meaning |
|---|---|---|
| "start" | (B,) int64 | first real position of each row; absent (or None) when no row is padded |
| "pos" | int | tokens of the sequence this cache has consumed so far (absolute index of the next token) |

plus each mixer's own state: FM "state" (B, H, m, d_mem); Mamba-2 "conv" (B, d_conv - 1, conv_dim) and "ssm"
(B, H, N, P); attention "k", "v" (B, H_kv, S, D). A prompt may be fed in several calls (chunked prefill): the
pad positions of a call are those of absolute index pos ... pos + T - 1 below "start".
"""

from __future__ import annotations

import torch


def pad_positions(cache: dict | None, T: int, device: torch.device) -> torch.Tensor | None:
    """(B, T) bool, True at the left-padding positions of a call of T tokens into `cache`; None when the cache
    records no padding (no cache, no "start")."""
    start = None if cache is None else cache.get("start")
    if start is None:
        return None
    idx = cache.get("pos", 0) + torch.arange(T, device=device)
    return idx[None, :] < start.to(device)[:, None]


def advance(cache: dict | None, T: int) -> None:
    """Count T more consumed tokens in `cache` (a no-op without one)."""
    if cache is not None:
        cache["pos"] = cache.get("pos", 0) + T


def padded_positions(start: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """RoPE positions (B, T) of the call's tokens in left-padded rows: absolute index minus start[b], 0 on pads."""
    idx = past + torch.arange(T, device=start.device)
    return (idx[None, :] - start[:, None]).clamp(min=0)


def padded_key_mask(start: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """Boolean (B, 1, T, past + T) attention mask of a cached call, True = attend: query t (absolute index
    past + t) sees key j <= past + t that is real (j >= start[b]); a pad query sees only itself."""
    q = past + torch.arange(T, device=start.device)
    j = torch.arange(past + T, device=start.device)
    real = j[None, None, :] >= start[:, None, None]  # (B, 1, S)
    mask = (j[None, :] <= q[:, None])[None] & (real | (j[None, :] == q[:, None])[None])
    return mask[:, None]
