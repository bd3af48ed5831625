"""Hand-made runs whose every logged value is known, written into a real MLflow store through MlflowClient.

Three runs (their expected table values are worked out in `EXPECTED`):
- `fm-a`: FM, tokens from `train/tokens`; validation at steps 0, 5, 10 (0, 5000, 10000 tokens) with step 5
  logged twice (a resumed run's replay: the later value, 6.0, wins); downstream under the new names;
  router statistics of two layers; world_size 2, last training metric 1.5 h after the start; long-context
  evaluations at step 5 (EN up to 8192) and step 10 (EN up to 4096, JA up to 2048: the latest, the only one read)
  and retrieval (passkey at 1024 and 4096) at step 10.
- `attn-b`: attention, no `train/tokens`: tokens = `train/consumed_samples` x `data.seq_len` (1500 per step);
  validation at steps 0, 2, 3 (NaN, ignored), 5; downstream under the older `eval/...` names; EN long context up
  to 3000 at step 5 (2048 logged twice: the later value wins), no JA; retrieval (passkey, needle_en) at 1024.
- `mamba-c`: Mamba-2, no token metric at all: tokens from the batch params (2 x 1 x 4 ranks x 100 = 800 per
  step); no n_params, no MFU, no downstream scores, no long-context or retrieval metrics (blanks to be counted).
Matched tokens: min(10000, 7500, 8000) = 7500. Long-context column lengths: EN 2048 (fm-a logged 1024, 2048, 4096
at its latest step, attn-b 1024, 2048, 3000), JA 2048 (fm-a alone).
"""

from __future__ import annotations

import math

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from fm_pretrain.tracking import ensure_store

# Overrides of the tests that train for real (tests/compare/test_http_store.py, tests/e2e/test_study.py) on top of
# configs/tiny_*.yaml: a few steps, a validation loss every 2 (train.val_* were train.eval_* before the rename).
TINY_TRAINING = ["train.steps=4", "train.val_every=2", "train.val_batches=2", "train.log_every=1", "train.save_every=4"]
T0 = 1_700_000_000_000  # ms
HOUR = 3_600_000
EXPERIMENT = "handmade"


def _log(client: MlflowClient, run_id: str, metrics: dict[str, list[tuple[int, float, int]]], params, tags) -> None:
    batch = [Metric(k, v, ts, step) for k, pts in metrics.items() for step, v, ts in pts]
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])  # fmt: skip


def at(step: int, hours: float) -> int:
    return T0 + int(hours * HOUR) + step  # distinct timestamps, increasing with step


def log_handmade(uri: str, experiment: str = EXPERIMENT) -> dict[str, str]:
    """Create the three runs in `experiment` of the store at `uri`; returns {name: run id}."""
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_store(uri, experiment)  # artifacts of a sqlite store beside it, not in the cwd's ./mlruns
    ids = {}

    # fm-a
    run = client.create_run(exp_id, start_time=T0, run_name="fm-a")
    m = {
        "train/tokens": [(s, 1000.0 * s, at(s, 0.1 * s)) for s in range(1, 11)],
        "train/loss": [(s, 10.0 - 0.5 * s, at(s, 0.1 * s)) for s in range(1, 11)],
        "perf/tokens_per_s": [
            (s, v, at(s, 0.1 * s))
            for s, v in zip(range(1, 11), [100, 900, 1000, 1100, 1000, 1000, 1000, 1000, 1000, 1000])
        ],
        "perf/mfu": [(s, 0.1 if s == 1 else 0.4, at(s, 0.1 * s)) for s in range(1, 11)],
        # step 5 twice: a first value, then the resumed run's replay logged later (which wins)
        "val/loss": [(0, 10.0, at(0, 0)), (5, 7.0, at(5, 0.5)), (5, 6.0, at(5, 0.8)), (10, 4.0, at(10, 1.5))],
        "downstream/arc_easy/acc_norm": [(10, 0.5, at(10, 2.0))],
        "downstream/arc_easy/acc": [(10, 0.4, at(10, 2.0))],
        "downstream/jnli/acc": [(10, 0.6, at(10, 2.0))],
        "router/layer0/entropy": [(5, 2.0, at(5, 0.5)), (10, 1.0, at(10, 1.0))],
        "router/layer1/entropy": [(5, 3.0, at(5, 0.5)), (10, 2.0, at(10, 1.0))],
        "router/layer0/dead_rows": [(5, 0.0, at(5, 0.5)), (10, 1.0, at(10, 1.0))],
        "router/layer1/dead_rows": [(5, 2.0, at(5, 0.5)), (10, 3.0, at(10, 1.0))],
        # offline evaluations (fm_pretrain/eval/run_logging.py): only the latest step's lengths count; the bucket
        # NLL, the overall and the per-depth retrieval accuracy are not read
        "long_context/en/loss_so_far/1024": [(5, 3.5, at(5, 0.6)), (10, 3.0, at(10, 2.1))],
        "long_context/en/loss_so_far/2048": [(5, 3.3, at(5, 0.6)), (10, 2.8, at(10, 2.1))],
        "long_context/en/loss_so_far/4096": [(5, 3.2, at(5, 0.6)), (10, 2.7, at(10, 2.1))],
        "long_context/en/loss_so_far/8192": [(5, 3.1, at(5, 0.6))],
        "long_context/en/nll/0-128": [(10, 4.0, at(10, 2.1))],
        "long_context/ja/loss_so_far/1024": [(10, 3.4, at(10, 2.1))],
        "long_context/ja/loss_so_far/2048": [(10, 3.3, at(10, 2.1))],
        "retrieval/passkey/acc": [(10, 0.75, at(10, 2.2))],
        "retrieval/passkey/acc/1024": [(10, 1.0, at(10, 2.2))],
        "retrieval/passkey/acc/4096": [(10, 0.5, at(10, 2.2))],
        "retrieval/passkey/acc/4096/0.5": [(10, 0.0, at(10, 2.2))],
    }
    params = {"model.layer_pattern": "['fm']", "model.fm.n_memories": 16, "model.fm.top_k": 4,
              "model.fm.tau": 1.0, "data.seq_len": 100, "train.micro_batch_size": 5, "n_params": 1000,
              "flops_per_token": 6000}  # fmt: skip
    tags = {"model_type": "fm", "world_size": 2, "kind": "training", "layer_pattern": "fm", "size": "tiny"}
    _log(client, run.info.run_id, m, params, tags)
    client.set_terminated(run.info.run_id, end_time=at(10, 2.0))
    ids["fm-a"] = run.info.run_id

    # attn-b: tokens from consumed samples x seq_len
    run = client.create_run(exp_id, start_time=T0, run_name="attn-b")
    m = {
        "train/consumed_samples": [(s, 15.0 * s, at(s, 0.2 * s)) for s in range(1, 6)],
        "train/loss": [(s, 9.0 - 0.3 * s, at(s, 0.2 * s)) for s in range(1, 6)],
        "perf/tokens_per_s": [(s, 2000.0, at(s, 0.2 * s)) for s in range(1, 6)],
        "val/loss": [(0, 9.0, at(0, 0)), (2, 7.0, at(2, 0.4)), (3, math.nan, at(3, 0.6)), (5, 5.5, at(5, 1.0))],
        "eval/arc_easy/acc_norm": [(5, 0.3, at(5, 1.2))],
        "eval/boolq/acc": [(5, 0.7, at(5, 1.2))],
        "eval/jnli/acc": [(5, 0.5, at(5, 1.2))],
        "long_context/en/loss_so_far/1024": [(5, 4.0, at(5, 1.3))],
        "long_context/en/loss_so_far/2048": [(5, 3.95, at(5, 1.3)), (5, 3.9, at(5, 1.4))],  # a re-run: 3.9 wins
        "long_context/en/loss_so_far/3000": [(5, 3.85, at(5, 1.3))],
        "retrieval/passkey/acc/1024": [(5, 0.6, at(5, 1.5))],
        "retrieval/needle_en/acc/1024": [(5, 0.8, at(5, 1.5))],
    }
    params = {"model.layer_pattern": "['attention']", "model.fm.n_memories": 16, "model.fm.top_k": 4,
              "model.fm.tau": 1.0, "data.seq_len": 100, "n_params": 2000, "flops_per_token": 12000}  # fmt: skip
    tags = {"model_type": "attention", "world_size": 1, "kind": "training"}
    _log(client, run.info.run_id, m, params, tags)
    client.set_terminated(run.info.run_id, end_time=at(5, 1.2))
    ids["attn-b"] = run.info.run_id

    # mamba-c: tokens from the batch params only
    run = client.create_run(exp_id, start_time=T0, run_name="mamba-c")
    m = {
        "train/loss": [(s, 8.0, at(s, 0.25 * s)) for s in range(1, 11)],
        "val/loss": [(0, 11.0, at(0, 0)), (10, 6.5, at(10, 2.5))],
    }
    params = {"model.layer_pattern": "['mamba2']", "data.seq_len": 100, "train.micro_batch_size": 2,
              "train.grad_accum": 1}  # fmt: skip
    tags = {"model_type": "mamba2", "world_size": 4, "kind": "training"}
    _log(client, run.info.run_id, m, params, tags)
    client.set_terminated(run.info.run_id, status="KILLED", end_time=at(10, 2.5))
    ids["mamba-c"] = run.info.run_id
    return ids


MATCHED_TOKENS = 7500.0
EXPECTED = {
    "fm-a": {"tokens": 10000.0, "val_loss_final": 4.0, "val_loss_best": 4.0, "val_loss_matched": 5.0,
             "tokens_per_s": 1000.0, "mfu": 0.4, "device_hours": 2 * 1.5 + 2 * 10 / HOUR, "n_params": 1000.0,
             "m": "16", "k": "4", "tau": "1", "layer_pattern": "fm", "model_type": "fm",
             "downstream_en": 0.5, "downstream_ja": 0.6, "long_context_en": 2.8, "long_context_ja": 3.3,
             "status": "FINISHED"},
    "attn-b": {"tokens": 7500.0, "val_loss_final": 5.5, "val_loss_best": 5.5, "val_loss_matched": 5.5,
               "tokens_per_s": 2000.0, "mfu": None, "device_hours": 1.0 + 5 / HOUR, "n_params": 2000.0,
               "m": "n/a", "k": "n/a", "tau": "n/a", "layer_pattern": "attention", "model_type": "attention",
               "downstream_en": 0.3, "downstream_ja": 0.5, "long_context_en": 3.9, "long_context_ja": None,
               "status": "FINISHED"},
    "mamba-c": {"tokens": 8000.0, "val_loss_final": 6.5, "val_loss_best": 6.5,
                "val_loss_matched": 11.0 - 4.5 * 7500 / 8000, "tokens_per_s": None, "mfu": None,
                "device_hours": 4 * 2.5 + 4 * 10 / HOUR, "n_params": None, "layer_pattern": "mamba2",
                "model_type": "mamba2", "downstream_en": None, "downstream_ja": None, "long_context_en": None,
                "long_context_ja": None, "status": "KILLED"},
}  # fmt: skip
LONG_CONTEXT_LENGTHS = {"en": 2048, "ja": 2048}
# run -> {lang or task: (step, {length: value})} of the latest evaluation
LONG_CONTEXT = {
    "fm-a": {"en": (10, {1024: 3.0, 2048: 2.8, 4096: 2.7}), "ja": (10, {1024: 3.4, 2048: 3.3})},
    "attn-b": {"en": (5, {1024: 4.0, 2048: 3.9, 3000: 3.85})},
    "mamba-c": {},
}
RETRIEVAL = {
    "fm-a": {"passkey": (10, {1024: 1.0, 4096: 0.5})},
    "attn-b": {"passkey": (5, {1024: 0.6}), "needle_en": (5, {1024: 0.8})},
    "mamba-c": {},
}
