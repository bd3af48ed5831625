"""The parts the training loop calls, each deciding for itself when it is due (the one rule: `due`).

- `LossWindow`: the training losses since the last log line, summed on the device;
- `Validator`: the validation loss (`train.val_every`);
- `Checkpointer`: resume and save (`train.save_every`), through `fm_pretrain.checkpoint`;
- `DownstreamEval`: English/Japanese tasks during training (`downstream.every`);
- `Throughput`: tokens/s and MFU between log lines, excluding time spent validating, evaluating or saving;
- `RouterMonitor`: router statistics of the FM layers, with the training metrics; a usage heatmap at validation.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fm_pretrain.checkpoint import CheckpointLayout, find_resume, load_checkpoint, save_checkpoint
from fm_pretrain.config import DownstreamConfig, TrainConfig
from fm_pretrain.data import IGNORE_INDEX

log = logging.getLogger("fm_pretrain.train")


def due(step: int, every: int, last_step: int) -> bool:
    """The one schedule rule: after every `every`-th step and after the last one (`every` <= 0: the last only)."""
    return step == last_step or (every > 0 and step % every == 0)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped ones included)
    consumed: int = 0  # global samples consumed: the data position, checkpointed


class LossWindow:
    """Mean training loss (and auxiliary loss) over the non-skipped steps since the last log line.

    The sums stay on the device in float64 (the same arithmetic as Python floats), so adding a step never waits
    for the host; `mean_over_ranks` is the one sync, at log time.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.count = 0

    def add(self, loss: torch.Tensor, aux: torch.Tensor) -> None:
        self.sums[0] += loss
        self.sums[1] += aux
        self.count += 1

    def mean_over_ranks(self) -> tuple[float, float]:
        """(loss, aux) averaged over this window and over all ranks; NaN for a window of skipped steps only."""
        mean = self.sums / self.count if self.count else torch.full_like(self.sums, math.nan)
        dist.all_reduce(mean)
        loss, aux = (mean / dist.get_world_size()).tolist()  # host sync: once per log line
        self.reset()
        return loss, aux


class Throughput:
    """Training time since the last log line; pauses (validation, evaluation, saving) are left out."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None, world: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_flops * world if peak_flops else None
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        tok_s = self.tokens_per_step * self.steps / elapsed
        out = {"perf/tokens_per_s": tok_s, "perf/step_time_s": elapsed / self.steps}
        if self.peak_total is not None:
            out["perf/mfu"] = tok_s * self.flops_per_token / self.peak_total
        if torch.cuda.is_available():  # this rank's peak since the start (rank 0 logs)
            out["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


class Validator:
    """Token-weighted validation loss over this rank's fixed validation micro-batches, combined over all ranks."""

    def __init__(self, cfg: TrainConfig, batches: list[dict], device: torch.device):
        self.every, self.last, self.batches, self.device = cfg.val_every, cfg.steps, batches, device

    def due(self, step: int) -> bool:
        return due(step, self.every, self.last)

    @torch.no_grad()
    def validation_loss(self, engine) -> float:
        engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x tokens, tokens
        for batch in self.batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            n = (batch["labels"] != IGNORE_INDEX).sum()
            sums[0] += engine(**batch).lm_loss.double() * n
            sums[1] += n
        engine.train()
        dist.all_reduce(sums)
        return float(sums[0] / sums[1])  # host sync: once per validation


class Checkpointer:
    """Resume at start, save every `train.save_every` steps, at the last step and when asked to stop."""

    def __init__(self, cfg: TrainConfig, layout: CheckpointLayout, meta: dict[str, Any], universal_info: dict | None):
        self.cfg, self.layout, self.meta, self.universal_info = cfg, layout, meta, universal_info
        self.dir = Path(cfg.run_dir) / "checkpoints"

    def due(self, step: int) -> bool:
        """Every `train.save_every` steps and after the last; never with save_every = 0 (a stop signal still saves)."""
        return self.cfg.save_every > 0 and due(step, self.cfg.save_every, self.cfg.steps)

    def resume(self, engine) -> TrainState:
        """The checkpoint's step and data position (train.resume_from, else `latest`), or a fresh state."""
        tag_dir = find_resume(self.dir, self.cfg.resume, self.cfg.resume_from)
        if tag_dir is None:
            return TrainState()
        sha, identity = self.meta["tokenizer_sha256"], self.meta["data"]
        meta = load_checkpoint(engine, tag_dir, self.layout, sha, identity, self.cfg.allow_data_change)
        state = TrainState(int(meta["step"]), int(meta["consumed_samples"]))
        log.info("resumed from %s at step %d (%d samples consumed)", tag_dir, state.step, state.consumed)
        return state

    def save(self, engine, state: TrainState) -> None:
        save_checkpoint(
            engine, self.dir, state.step, state.consumed, self.layout, self.meta, self.cfg.keep_last,
            universal_info=self.universal_info,
        )  # fmt: skip


class DownstreamEval:
    """English/Japanese tasks (`downstream` section) every `downstream.every` steps and at the end, the items split
    over the data-parallel ranks (fm_pretrain/eval/dp.py) and logged by rank 0."""

    def __init__(self, cfg: DownstreamConfig, last_step: int, tokenizer, run_dir: Path):
        self.cfg, self.last, self.tokenizer, self.run_dir = cfg, last_step, tokenizer, run_dir

    def due(self, step: int) -> bool:
        return self.cfg.enabled and due(step, self.cfg.every, self.last)

    def run(self, model: torch.nn.Module, step: int, rank: int, tracker) -> None:
        from fm_pretrain.eval.during_training import evaluate_in_training

        evaluate_in_training(self.cfg, model, self.tokenizer, step, rank, tracker, self.run_dir)


class RouterMonitor:
    """Router statistics of the routed layers (model/router_stats.py): FM layers (H heads of m rows) and
    Mixture-of-Memories layers (one router over M memories: H = 1, m = M), wrapped in Memory Caching or not. Every
    training forward adds its routing into device-side sums; at each log line they are summed over the
    data-parallel group and logged as `router/layer<i>/{entropy,dead_rows,max_load,mean_load}` (this TP rank's
    heads: TP rank 0's on the log), and at each validation a usage heatmap (layer x row) per kind goes to the run
    as `router/usage_step_<N>.png` (FM) and `router/mom_usage_step_<N>.png` (MoM)."""

    def __init__(self, model: torch.nn.Module, enabled: bool, device: torch.device, dp_group=None):
        from fm_pretrain.model.router_stats import RouterStatsAccumulator

        groups: dict[str, list[tuple[int, torch.nn.Module]]] = {}
        for i, block in enumerate(model.blocks if enabled else []):
            if block.kind in ("fm", "mom"):
                groups.setdefault(block.kind, []).append((i, block.mixer))
        self.accs: dict[str, RouterStatsAccumulator] = {}  # one per kind: every layer of a kind has the same shape
        for kind, layers in groups.items():
            first = layers[0][1]
            heads = first.n_heads if kind == "fm" else 1
            acc = RouterStatsAccumulator([i for i, _ in layers], heads, first.n_memories, device)
            for _, mixer in layers:
                mixer.router_stats = acc
            self.accs[kind] = acc
        self.group = dp_group
        self._have_window = False

    def metrics(self) -> dict[str, float]:
        """The window's statistics (collectives over the data-parallel group: every rank calls it)."""
        out: dict[str, float] = {}
        for kind in sorted(self.accs):  # the same order on every rank
            out.update(self.accs[kind].compute(all_reduce=True, process_group=self.group))
        self._have_window = bool(self.accs)
        return out

    def log_heatmap(self, tracker, step: int) -> None:
        if not self._have_window or tracker.run_id is None:
            return
        from fm_pretrain.model.router_stats import plot_usage_heatmap

        for kind, acc in sorted(self.accs.items()):
            prefix, what = ("", "router") if kind == "fm" else (f"{kind}_", "MoM router")
            with tempfile.TemporaryDirectory() as tmp:
                out = plot_usage_heatmap(acc.usage(), f"{tmp}/{prefix}usage_step_{step}.png", acc.layers,
                                         title=f"{what} usage, step {step}")  # fmt: skip
                tracker.log_artifact(out, "router")
