"""Downstream evaluation inside a training run (config section `downstream`), so task curves sit beside the loss.

Every data-parallel rank scores its share of the items with the model it holds (`engine.module`, whole
parameters: ZeRO 0-2 at tensor-parallel size 1; the config refuses the other layouts, where the CLI on a saved
checkpoint is the way): whole batches of the one-rank split, gathered afterwards (eval/dp.py), so the scores equal
a one-rank evaluation's. Rank 0 logs the metrics into the training run as `downstream/<task>/<metric>` at the
current step, with the results and the chart as artifacts under `downstream/step_N/`, and `eval_results.json`
into the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from fm_pretrain.config import DownstreamConfig

from .dp import data_parallel_shard
from .report import METRIC_PREFIX, PLOT_FILE, RESULTS_FILE, flat_metrics, format_table, plot_accuracy, write_results
from .runner import evaluate_model

log = logging.getLogger(__name__)


def evaluate_in_training(
    cfg: DownstreamConfig, model: nn.Module, tokenizer, step: int, rank: int, tracker, run_dir: Path
) -> dict[str, Any] | None:
    """Evaluate on all ranks (each its share), log on rank 0; every rank returns after rank 0 is done (rank 0 gets
    the results)."""
    results = evaluate_model(
        model,
        tokenizer,
        cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        data_dir=cfg.data_dir or None,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=cfg.seed,
        progress=False,
        shard=data_parallel_shard(),
    )
    if rank != 0:
        results = None
    else:
        results["step"] = step
        tracker.log_metrics(flat_metrics(results), step)
        out_dir = run_dir / METRIC_PREFIX / f"step_{step}"
        out_dir.mkdir(parents=True, exist_ok=True)
        write_results(results, out_dir / RESULTS_FILE)
        plot_accuracy(results, out_dir / PLOT_FILE, f"{run_dir.resolve().name} step {step}")
        tracker.log_artifact(out_dir, f"{METRIC_PREFIX}/step_{step}")
        log.info("downstream evaluation at step %d:\n%s", step, format_table(results))
    if dist.is_initialized():
        dist.barrier()
    return results
