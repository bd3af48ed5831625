"""The training loop. Reads top to bottom: take a step, then let each component say whether it is due.

Host syncs are few and flagged: the loss window at log time, the validation loss, the stop-signal agreement
(one all-reduce per step), and whatever DeepSpeed's overflow check does inside `engine.step()`. A micro-step
never waits for the host: losses accumulate as device tensors and the non-finite guard poisons the gradients on
the device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from fm_pretrain.config import ExperimentConfig
from fm_pretrain.data.packed import micro_batches
from fm_pretrain.testing import faults
from fm_pretrain.tracking import Tracker
from fm_pretrain.training.components import (
    Checkpointer,
    DownstreamEval,
    LossWindow,
    RouterMonitor,
    Throughput,
    TrainState,
    Validator,
    due,
)
from fm_pretrain.training.guards import NonFiniteGuard, poison_nonfinite
from fm_pretrain.training.signals import StopRequest

log = logging.getLogger("fm_pretrain.train")


@dataclass
class Trainer:
    cfg: ExperimentConfig
    engine: object  # deepspeed.DeepSpeedEngine
    data: object  # fm_pretrain.data.training_data.TrainData: train set, sampler, validation batches
    state: TrainState
    tracker: Tracker
    validator: Validator
    checkpointer: Checkpointer
    downstream: DownstreamEval
    throughput: Throughput
    router: RouterMonitor
    rank: int
    dp_rank: int
    dp: int
    global_batch: int
    device: torch.device

    def train(self) -> None:
        t = self.cfg.train
        if self.state.step == 0:  # the untrained model's validation loss: where the curve starts
            self.tracker.log_metrics({"val/loss": self.validator.validation_loss(self.engine)}, 0)
        self.engine.train()
        window, guard = LossWindow(self.device), NonFiniteGuard(self.engine, t.max_consecutive_nonfinite)
        stop = StopRequest(enabled=t.save_on_signal)
        try:
            while self.state.step < t.steps:
                loss, aux = self.train_step()
                step = self.state.step = self.state.step + 1
                self.state.consumed += self.global_batch  # a skipped step's batch is not retried
                if not guard.after_step(step):  # skipped steps stay out of train/loss
                    window.add(loss, aux)
                self.throughput.step()
                if due(step, t.log_every, t.steps):
                    self.log_training(step, window, guard.total)
                if self.validator.due(step):
                    self.validate(step)
                if self.downstream.due(step):  # English/Japanese tasks, items split over the ranks
                    self.downstream.run(self.engine.module, step, self.rank, self.tracker)
                    self.throughput.restart()  # evaluation time is not training throughput
                faults.after_step(step)
                stopping = stop.agreed(self.device)  # SIGTERM/SIGUSR1 on any rank: all stop after this step
                if self.checkpointer.due(step) or stopping:
                    self.checkpointer.save(self.engine, self.state)
                    self.throughput.restart()  # checkpoint time is not training throughput
                if stopping:
                    log.warning("stop signal %s: saved the checkpoint of step %d, exiting", stop.received, step)
                    break
        finally:
            stop.restore()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns the mean (lm loss, aux loss) as float64
        device tensors. DeepSpeed applies the update (or skips it) at the gradient-accumulation boundary."""
        batches = micro_batches(
            self.data.train, self.data.sampler, self.state.consumed, self.global_batch,
            self.cfg.train.micro_batch_size, self.dp_rank, self.dp,
        )  # fmt: skip
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        aux = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            out = self.engine(**{k: v.to(self.device) for k, v in batch.items()})
            self.engine.backward(poison_nonfinite(faults.on_loss(out.loss, self.state.step + 1, self.rank)))
            self.engine.step()
            loss += out.lm_loss.detach().double() / len(batches)
            if out.aux_loss is not None:
                aux += out.aux_loss.detach().double() / len(batches)
        return loss, aux

    def log_training(self, step: int, window: LossWindow, skipped: int) -> None:
        loss, aux = window.mean_over_ranks()  # host sync, at log time only
        metrics = {
            "train/loss": loss,
            "train/lr": self.engine.lr_scheduler.get_last_lr()[0],
            **self.throughput.metrics(),
            "train/consumed_samples": self.state.consumed,
            "train/tokens": self.state.consumed * self.cfg.data.seq_len,
            "train/skipped_steps": skipped,
        }
        m = self.cfg.model
        if any(kind in m.layer_pattern and getattr(m, kind).aux_loss_weight > 0 for kind in ("fm", "mom")):
            metrics["train/aux_loss"] = aux  # FM's and MoM's balancing losses, weighted; not part of train/loss
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(self.router.metrics())  # a collective over the data-parallel group; one host sync
        self.tracker.log_metrics(metrics, step)
        self.throughput.restart()

    def validate(self, step: int) -> None:
        val = self.validator.validation_loss(self.engine)
        self.tracker.log_metrics({"val/loss": val, "val/ppl": math.exp(min(val, 50.0))}, step)
        self.router.log_heatmap(self.tracker, step)  # rank 0, the last log window's row usage
        self.throughput.restart()
