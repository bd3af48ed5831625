"""Typed experiment configuration: one YAML per experiment, validated on load, CLI overrides.

Every section is a dataclass. Loading is strict: an unknown key, a wrong type or an out-of-range value
raises ConfigError naming the dotted key (and the file) so typos never silently fall back to defaults; a key
that was renamed names its new name. What can be checked from the config alone is checked here; what needs
the machine (world size, devices, files, the DeepSpeed config) is checked by `fm_pretrain.training.preflight`.

This module imports nothing else of the project (tests/test_imports.py enforces it): every other module may
import it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


MIXERS = ("fm", "attention", "mamba2", "gla", "gated_delta", "mom")
# Mixers whose state is a linear memory read as S^T q: Memory Caching (model.memory_caching) can wrap them.
MEMORY_CACHING_MIXERS = ("fm", "gla", "gated_delta", "mamba2", "mom")


@dataclass
class FMConfig:
    """Factorization Memory mixer (docs/fm_spec.md). Every OPEN point of the spec is an option here."""

    n_heads: int = 4
    n_memories: int = 64  # m: memory rows per head
    d_mem: int = 64  # width of each memory row
    top_k: int | None = None  # None or == n_memories: dense variant; else sparse top-k routing
    tau: float = 1.0  # router softmax temperature (OPEN; the paper grid-searches it)
    rate_per_row: bool = True  # OPEN: eta/mu one rate per row (True) or one scalar per head (False)
    output_gate: bool = False  # OPEN: SiLU output gate before W_o
    aux_loss_weight: float = 0.0  # OPEN: Switch-style load-balancing loss (MoM uses 0.01); off per paper
    rate_bias_init: float = 0.0  # initial b_eta and b_mu (sigma(0) = 0.5)
    chunk_size: int = 64  # chunk length of the parallel (chunked) path
    backend: Literal["auto", "torch", "triton"] = "auto"  # auto: triton on GPU when available, else torch


@dataclass
class AttentionConfig:
    """Causal softmax attention with RoPE (the LLaMA baseline)."""

    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    rope_theta: float = 10000.0


@dataclass
class Mamba2Config:
    """Mamba-2 mixer (chunked SSD)."""

    d_state: int = 64  # N
    head_dim: int = 64  # P
    expand: int = 2  # d_inner = expand * d_model
    n_groups: int = 1  # B/C groups shared by heads
    d_conv: int = 4  # depthwise causal convolution width
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1


@dataclass
class GLAConfig:
    """Gated linear attention (Yang et al. 2023): per-key decay on the shared gated kernels (docs/memory_family.md)."""

    n_heads: int = 4
    d_key: int = 64  # K per head (queries and keys)
    d_value: int = 64  # V per head
    gate_low_rank: int = 16  # the forget gate's projection W_g = W_up W_down of this rank; 0: one full-rank matrix
    gate_norm: float = 16.0  # log-decay g = logsigmoid(W_g x + b) / gate_norm (GLA's "gate logit normaliser")
    output_gate: bool = True  # SiLU output gate after the per-head RMSNorm
    short_conv: bool = False  # depthwise causal conv (+ SiLU) on q, k, v
    d_conv: int = 4
    chunk_size: int = 64
    backend: Literal["auto", "torch", "triton"] = "auto"  # the gated kernels' backend, as model.fm.backend


@dataclass
class GatedDeltaConfig:
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024): the gated delta rule (docs/memory_family.md)."""

    n_heads: int = 4
    d_key: int = 64  # K per head (q and k are L2-normalised)
    d_value: int = 128  # V per head
    output_gate: bool = True  # SiLU output gate after the per-head RMSNorm
    short_conv: bool = True  # depthwise causal conv (+ SiLU) on q, k, v, as the reference requires
    d_conv: int = 4
    chunk_size: int = 64
    dt_min: float = 0.001  # initial softplus(dt_bias) log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    # the chunked path: torch (ours, every device) or fla (flash-linear-attention's Triton kernel, CUDA, optional
    # dependency); auto: fla on CUDA when it imports, else torch. FM_PRETRAIN_KERNELS=torch|triton overrides.
    backend: Literal["auto", "torch", "fla"] = "auto"


@dataclass
class MoMConfig:
    """Mixture-of-Memories (Du et al. 2025): a router sends each token to top_k of n_memories linear memories,
    plus a shared memory (../shared/MEMORY_FAMILY_SPEC.md; docs/memory_family.md)."""

    n_memories: int = 4  # M (the paper's 340M / 1.3B models; FLA's layer default is 8)
    top_k: int = 2
    inner: Literal["gla", "gated_delta"] = "gla"  # OPEN: the memories' update rule
    shared_memory: bool = True  # OPEN: a memory every token writes and reads, added unweighted
    n_heads: int = 4
    d_key: int = 64
    d_value: int = 64
    gate_norm: float = 16.0  # inner gla: g = logsigmoid(W_g x) / gate_norm
    output_gate: bool = True
    short_conv: bool | None = None  # None: on for inner gated_delta, off for gla (the spec's defaults)
    d_conv: int = 4
    aux_loss_weight: float = 0.01  # Switch-style balancing loss M * sum_j f_j P_j (the reference's weight)
    chunk_size: int = 32  # chunk of the per-memory scans (each memory's tokens are padded to a multiple of it)
    dt_min: float = 0.001  # inner gated_delta: initial softplus(dt_bias), as model.gated_delta
    dt_max: float = 0.1


@dataclass
class MemoryCachingConfig:
    """Memory Caching (Behrouz et al. 2026) over linear-memory mixers: segment states are cached and read back
    (../shared/MEMORY_FAMILY_SPEC.md; docs/memory_family.md). Off unless `mixers` names a layer kind."""

    mixers: list[str] = field(default_factory=list)  # layer kinds wrapped, from MEMORY_CACHING_MIXERS
    aggregation: Literal["residual", "grm", "soup", "ssc"] = "grm"  # soup == grm for linear memories
    segmentation: Literal["constant", "log"] = "constant"  # OPEN
    segment_size: int = 256  # constant: the segment length; log: the unit of the binary expansion
    state_mode: Literal["checkpoint", "independent"] = "checkpoint"  # OPEN: segment i+1 starts from S^(i) or 0
    top_k_segments: int = 2  # ssc: cached segments kept per token (the online memory is always kept)
    descriptor: Literal["u", "keys"] = "u"  # OPEN: segment descriptor c^(i) = mean of u = W_u x, or of the keys
    d_gate: int = 32  # width of u per head (grm, soup, ssc)


def swiglu_width(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's SwiGLU width: 8/3 * d_model rounded up to a multiple of `multiple_of`."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    vocab_size: int = 8000  # replaced at train time by the packed data's vocab size (meta.json)
    d_model: int = 256
    n_layers: int = 4
    # One entry per layer or a repeating pattern, e.g. ["fm"], ["fm", "fm", "attention"].
    layer_pattern: list[str] = field(default_factory=lambda: ["fm"])
    mlp_hidden: int | None = None  # None: SwiGLU width 8/3 * d_model rounded up to a multiple of 64
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 2048  # used for RoPE caches and generation limits
    fm: FMConfig = field(default_factory=FMConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    gla: GLAConfig = field(default_factory=GLAConfig)
    gated_delta: GatedDeltaConfig = field(default_factory=GatedDeltaConfig)
    mom: MoMConfig = field(default_factory=MoMConfig)
    memory_caching: MemoryCachingConfig = field(default_factory=MemoryCachingConfig)

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or swiglu_width(self.d_model)

    def mixer_of_layer(self, i: int) -> str:
        return self.layer_pattern[i % len(self.layer_pattern)]

    @property
    def model_type(self) -> str:
        kinds = sorted(set(self.layer_pattern))
        return kinds[0] if len(kinds) == 1 else "hybrid-" + "+".join(kinds)


@dataclass
class DataConfig:
    path: str = ""  # directory written by data_prep/pack.py
    blend: str = ""  # or: a blend YAML over several packed directories (docs/data.md); exclusive with path
    tokenizer: str = ""  # sentencepiece .model (logged as an artifact, hash checked against the data)
    seq_len: int = 256
    seed: int = 1234  # the sample order (and a blend's, unless its YAML sets seed)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: fraction of total steps spent in the final decay


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 4  # sequences per rank per micro-step
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    ds_config: str = "ds_configs/zero1.json"  # ZeRO stage and engine options; batch/clip/precision filled in
    run_dir: str = "runs/default"
    val_every: int = 100  # validation loss every this many steps (and after the last)
    val_batches: int = 8  # validation micro-batches per data-parallel rank
    log_every: int = 10
    save_every: int = 500  # also after the last step; 0: no checkpoints (except on a stop signal)
    keep_last: int = 3
    resume: bool = True  # resume from run_dir/checkpoints/latest when present
    resume_from: str | None = None  # a step_N dir (or checkpoints dir) to resume from; missing -> error
    max_consecutive_nonfinite: int = 5  # stop (exit 3) after this many skipped steps in a row; 0: never
    collective_timeout_s: float = 600.0  # a collective waiting longer (dead/hung rank) fails the job
    save_on_signal: bool = True  # SIGTERM/SIGUSR1: checkpoint at the next step boundary, exit 0
    allow_data_change: bool = False  # resume although the data (blend, packed data, seq_len, seed) changed
    seed: int = 42
    peak_tflops: float | None = None  # per device, for MFU; None: looked up for known GPUs


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: sqlite file in run_dir (MLFLOW_TRACKING_URI overrides both)
    experiment: str = "fm-pretrain"
    run_name: str | None = None
    size: str = ""  # free-text size tag, e.g. "125m", "1b"
    system_metrics: bool = True  # MLflow's CPU/memory/disk/network (GPU with pynvml) sampler, `system/*` metrics
    system_metrics_interval_s: float = 10.0
    router_stats: bool = True  # FM/MoM routing entropy, dead rows and load per layer (router/layer<i>/*), heatmaps


@dataclass
class ParallelConfig:
    """Model parallelism on top of DeepSpeed's data parallelism (docs/parallelism.md)."""

    tensor_parallel: int = 1  # megatron-core TP size: consecutive ranks share each layer's heads; DP = world / TP
    activation_checkpointing: bool = False  # recompute each block's activations in backward (saves memory)


@dataclass
class DownstreamConfig:
    """Downstream (English/Japanese task) evaluation during training (docs/evaluation.md); `python -m
    fm_pretrain.eval` does it offline. Not to be confused with the validation loss (`train.val_every`)."""

    enabled: bool = False
    every: int = 0  # evaluate every this many steps; 0: only after the last step (always after the last step)
    tasks: str = "all"  # comma-separated task names or the groups en, ja, all
    num_fewshot: int = 0
    limit: int | None = 100  # items per task (None: all); the bundled fixtures hold 30
    data_dir: str = ""  # a directory laid out like data/eval; empty: the bundled fixtures
    batch_size: int = 8
    max_length: int | None = None  # None: model.max_seq_len
    seed: int = 1234


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


# Keys that were renamed: the old name is refused with an error naming the new one.
RENAMED_KEYS = {
    "train.eval_every": "train.val_every",
    "train.eval_batches": "train.val_batches",
    "eval": "downstream",
}


# ----------------------------------------------------------------------------------------------------------
# Loading, overrides, validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string; accept what parses as a number
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            if where in RENAMED_KEYS:
                raise ConfigError(f"'{where}' was renamed to '{RENAMED_KEYS[where]}'")
            raise ConfigError(f"unknown key '{where}' (allowed in {prefix or 'top level'}: {sorted(names)})")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k)
    obj = cls(**kwargs)
    return obj


def _parse_override_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node[parts[-1]] = _parse_override_value(text)
    return raw


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks; each error names the key."""
    m = cfg.model
    for i, name in enumerate(m.layer_pattern):
        if name not in MIXERS:
            raise ConfigError(f"model.layer_pattern[{i}]: unknown mixer '{name}' (choose from {list(MIXERS)})")
    if not m.layer_pattern:
        raise ConfigError("model.layer_pattern: must name at least one mixer")
    positives = {
        "model.vocab_size": m.vocab_size,
        "model.d_model": m.d_model,
        "model.n_layers": m.n_layers,
        "model.fm.n_heads": m.fm.n_heads,
        "model.fm.n_memories": m.fm.n_memories,
        "model.fm.d_mem": m.fm.d_mem,
        "model.fm.chunk_size": m.fm.chunk_size,
        "model.attention.n_heads": m.attention.n_heads,
        "model.mamba2.d_state": m.mamba2.d_state,
        "model.mamba2.head_dim": m.mamba2.head_dim,
        "model.mamba2.chunk_size": m.mamba2.chunk_size,
        "data.seq_len": cfg.data.seq_len,
        "train.steps": cfg.train.steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.val_every": cfg.train.val_every,
        "train.val_batches": cfg.train.val_batches,
        "train.log_every": cfg.train.log_every,
        "train.keep_last": cfg.train.keep_last,
        "train.collective_timeout_s": cfg.train.collective_timeout_s,
    }
    for key, val in positives.items():
        if val <= 0:
            raise ConfigError(f"{key}: must be > 0, got {val}")
    if cfg.train.save_every < 0:
        raise ConfigError(f"train.save_every: must be >= 0 (0: no checkpoints), got {cfg.train.save_every}")
    if cfg.train.max_consecutive_nonfinite < 0:
        raise ConfigError(f"train.max_consecutive_nonfinite: must be >= 0, got {cfg.train.max_consecutive_nonfinite}")
    fm = m.fm
    if fm.top_k is not None and not 1 <= fm.top_k <= fm.n_memories:
        raise ConfigError(f"model.fm.top_k: must be in [1, n_memories={fm.n_memories}], got {fm.top_k}")
    if fm.tau <= 0:
        raise ConfigError(f"model.fm.tau: must be > 0, got {fm.tau}")
    if "attention" in m.layer_pattern:
        a = m.attention
        if m.d_model % a.n_heads:
            raise ConfigError(f"model.attention.n_heads: {a.n_heads} does not divide d_model={m.d_model}")
        if a.n_kv_heads is not None and a.n_heads % a.n_kv_heads:
            raise ConfigError(f"model.attention.n_kv_heads: {a.n_kv_heads} does not divide n_heads={a.n_heads}")
    if "mamba2" in m.layer_pattern:
        mb = m.mamba2
        if (mb.expand * m.d_model) % mb.head_dim:
            raise ConfigError(
                f"model.mamba2.head_dim: {mb.head_dim} does not divide expand*d_model={mb.expand * m.d_model}"
            )
    _validate_memory_family(m)
    _validate_parallel(cfg)
    o = cfg.optim
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr: must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction: must be in (0, 1], got {o.decay_fraction}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
    if cfg.data.path and cfg.data.blend:
        raise ConfigError("data.blend: set data.path (one packed directory) or data.blend (a blend YAML), not both")
    _validate_downstream(cfg)
    return cfg


def _validate_memory_family(m: ModelConfig) -> None:
    """GLA, Gated DeltaNet, MoM and Memory Caching: sizes, top-k and the caching options."""
    sizes = {
        "gla": ("n_heads", "d_key", "d_value", "chunk_size", "d_conv"),
        "gated_delta": ("n_heads", "d_key", "d_value", "chunk_size", "d_conv"),
        "mom": ("n_memories", "n_heads", "d_key", "d_value", "chunk_size", "d_conv"),
    }
    for name, keys in sizes.items():
        sub = getattr(m, name)
        for key in keys:
            if getattr(sub, key) <= 0:
                raise ConfigError(f"model.{name}.{key}: must be > 0, got {getattr(sub, key)}")
    if m.gla.gate_low_rank < 0:
        raise ConfigError(f"model.gla.gate_low_rank: must be >= 0 (0: full rank), got {m.gla.gate_low_rank}")
    for name in ("gla", "mom"):
        if getattr(m, name).gate_norm <= 0:
            raise ConfigError(f"model.{name}.gate_norm: must be > 0, got {getattr(m, name).gate_norm}")
    if not 1 <= m.mom.top_k <= m.mom.n_memories:
        raise ConfigError(f"model.mom.top_k: must be in [1, n_memories={m.mom.n_memories}], got {m.mom.top_k}")
    if m.mom.aux_loss_weight < 0:
        raise ConfigError(f"model.mom.aux_loss_weight: must be >= 0, got {m.mom.aux_loss_weight}")
    mc = m.memory_caching
    for i, kind in enumerate(mc.mixers):
        if kind not in MEMORY_CACHING_MIXERS:
            raise ConfigError(
                f"model.memory_caching.mixers[{i}]: '{kind}' is not a linear-memory mixer Memory Caching can wrap "
                f"(choose from {list(MEMORY_CACHING_MIXERS)})"
            )
    if mc.segment_size <= 0 or mc.d_gate <= 0 or mc.top_k_segments <= 0:
        raise ConfigError(
            "model.memory_caching: segment_size, d_gate and top_k_segments must be > 0, got "
            f"{mc.segment_size}, {mc.d_gate}, {mc.top_k_segments}"
        )
    if mc.segmentation == "log" and mc.state_mode == "independent":
        raise ConfigError(
            "model.memory_caching.state_mode: logarithmic segmentation is implemented for 'checkpoint' states only"
        )
    if "mom" in mc.mixers and mc.state_mode != "checkpoint":
        raise ConfigError(
            "model.memory_caching.state_mode: Memory Caching over MoM ('mom' in mixers) supports 'checkpoint' only"
        )
    for kind in mc.mixers:
        if kind in m.layer_pattern:
            chunk = getattr(m, kind).chunk_size
            if mc.segment_size % chunk:
                raise ConfigError(
                    f"model.memory_caching.segment_size: {mc.segment_size} is not a multiple of "
                    f"model.{kind}.chunk_size={chunk} (cached states are the chunked path's boundary states)"
                )


def _validate_downstream(cfg: ExperimentConfig) -> None:
    """What the config alone decides; the task names and the ZeRO stage are checked by the preflight."""
    e = cfg.downstream
    if e.every < 0 or e.num_fewshot < 0 or e.batch_size < 1 or (e.limit is not None and e.limit < 1):
        raise ConfigError(
            f"downstream: need every >= 0, num_fewshot >= 0, batch_size >= 1, limit >= 1 or null; got "
            f"every={e.every}, num_fewshot={e.num_fewshot}, batch_size={e.batch_size}, limit={e.limit}"
        )
    if not e.enabled:
        return
    if not cfg.data.tokenizer:
        raise ConfigError("downstream.enabled: downstream evaluation needs data.tokenizer (the sentencepiece model)")
    if cfg.parallel.tensor_parallel > 1:
        raise ConfigError(
            "downstream.enabled: evaluation during training needs parallel.tensor_parallel=1 (whole weights on "
            "rank 0); evaluate the saved checkpoints with `python -m fm_pretrain.eval --checkpoint STEP_DIR` instead"
        )


def _validate_parallel(cfg: ExperimentConfig) -> None:
    """Tensor parallelism splits whole heads (and MLP columns) across ranks: every split must be even.
    The vocabulary need not divide: it is padded to a multiple of TP, and the padded logits are masked."""
    tp, m = cfg.parallel.tensor_parallel, cfg.model
    if tp < 1:
        raise ConfigError(f"parallel.tensor_parallel: must be >= 1, got {tp}")
    if tp == 1:
        return
    hidden = m.mlp_width
    splits = {"model.mlp_hidden": (hidden, f"SwiGLU width {hidden}")}  # key -> (count to split, what it is)
    if "fm" in m.layer_pattern:
        splits["model.fm.n_heads"] = (m.fm.n_heads, f"{m.fm.n_heads} heads")
    if "attention" in m.layer_pattern:
        n_kv = m.attention.n_kv_heads or m.attention.n_heads
        splits["model.attention.n_heads"] = (m.attention.n_heads, f"{m.attention.n_heads} heads")
        splits["model.attention.n_kv_heads"] = (n_kv, f"{n_kv} kv heads")
    for name in ("gla", "gated_delta", "mom"):
        if name in m.layer_pattern:
            n = getattr(m, name).n_heads
            splits[f"model.{name}.n_heads"] = (n, f"{n} heads")
    if "mamba2" in m.layer_pattern:
        heads = m.mamba2.expand * m.d_model // m.mamba2.head_dim
        splits["model.mamba2.head_dim"] = (heads, f"expand * d_model / head_dim = {heads} heads")
        splits["model.mamba2.n_groups"] = (m.mamba2.n_groups, f"{m.mamba2.n_groups} B/C groups")
    for key, (n, what) in splits.items():
        if n % tp:
            raise ConfigError(f"{key}: {what}, not divisible by parallel.tensor_parallel={tp}")


def from_dict(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    try:
        return validate(_from_dict(ExperimentConfig, raw or {}))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment file, apply `section.key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw, str(path))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used to log the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
