"""The MLflow names the comparison reads: what training, evaluation and the router statistics log.

Kept here as plain strings so that `python -m fm_pretrain.compare` never imports torch or the model; a test
checks the router names against `fm_pretrain.model.router_stats`.
"""

from __future__ import annotations

# Metrics logged by the trainer at its log / validation intervals.
VAL_LOSS = "val/loss"
TRAIN_LOSS = "train/loss"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
TOKENS = "train/tokens"  # tokens seen so far
CONSUMED_SAMPLES = "train/consumed_samples"  # fallback for tokens: x data.seq_len
# The histories read per run (in this order: history.py codes them by position).
HISTORY_KEYS = (VAL_LOSS, TRAIN_LOSS, TOKENS_PER_S, MFU, TOKENS, CONSUMED_SAMPLES)
# Keys whose timestamps mark training activity (device-hours end at the last of them).
TRAINING_KEYS = (VAL_LOSS, TRAIN_LOSS, TOKENS_PER_S, TOKENS, CONSUMED_SAMPLES)

# Downstream scores: `downstream/<task>/<metric>`; `eval/<task>/<metric>` is the older name, read as well.
DOWNSTREAM_PREFIXES = ("downstream", "eval")

# Router statistics of FM layers: `router/layer<i>/<stat>` (fm_pretrain/model/router_stats.py).
ROUTER_PREFIX = "router"
ROUTER_STATS = ("entropy", "dead_rows", "max_load", "mean_load")
# The per-step mean over layers that history.py builds from the per-layer keys.
ROUTER_MEAN_PREFIX = "router/mean"

# Offline evaluations of a checkpoint, logged into the training run at the checkpoint's step
# (fm_pretrain/eval/run_logging.py): the long-context loss-so-far at context length L,
# `long_context/<lang>/loss_so_far/<L>` (fm_pretrain/eval/long_context.py), and the retrieval accuracy at prompt
# length L over all depths, `retrieval/<task>/acc/<L>` (fm_pretrain/eval/retrieval.py).
LONG_CONTEXT_PREFIX = "long_context"
LONG_CONTEXT_LANGS = ("en", "ja")
LOSS_SO_FAR = "loss_so_far"
RETRIEVAL_PREFIX = "retrieval"
RETRIEVAL_ACC = "acc"

# Params (the flattened config, plus n_params and flops_per_token) and tags.
P_LAYER_PATTERN = "model.layer_pattern"
P_M = "model.fm.n_memories"
P_K = "model.fm.top_k"
P_TAU = "model.fm.tau"
P_SEQ_LEN = "data.seq_len"
P_MICRO_BATCH = "train.micro_batch_size"
P_GRAD_ACCUM = "train.grad_accum"
P_TP = "parallel.tensor_parallel"
P_N_PARAMS = "n_params"
P_FLOPS_PER_TOKEN = "flops_per_token"
T_MODEL_TYPE = "model_type"
T_SIZE = "size"
T_LAYER_PATTERN = "layer_pattern"
T_WORLD_SIZE = "world_size"
T_DEVICE = "device"
T_KIND = "kind"
KIND_TRAINING = "training"
KIND_COMPARISON = "comparison"
