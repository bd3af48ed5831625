"""Per-run curves and the comparison table.

Every number is derived from what the runs logged (names.py):

- tokens: `train/tokens`; else `train/consumed_samples` x `data.seq_len`; else step x micro_batch_size x grad_accum
  x (world_size / tensor_parallel) x seq_len (a constant global batch). Validation points get the token count of
  their step by linear interpolation between logged steps.
- final / best validation loss: `val/loss` at the last validation step / its minimum (non-finite points ignored).
- matched tokens: T* = the smallest, over the runs with validation losses, of the tokens at each run's last
  validation point, i.e. the largest token count every run reached; each run's validation loss at T* is
  interpolated linearly in tokens between its two validation points around T*.
- tokens/s, MFU: the median of `perf/tokens_per_s`, `perf/mfu` over the logged windows, leaving out the first
  window (it includes compilation and warm-up) when there are more.
- device-hours: tag `world_size` x wall-clock from the run's start to its last training metric (train/val loss,
  throughput, tokens); time spent queued between a stop and a resume counts as wall-clock too.
- FLOPs: tokens x param `flops_per_token` (training FLOPs per token).
- downstream: the latest `downstream/<task>/<metric>` (or older `eval/<task>/<metric>`) of each task's primary
  metric; the EN and JA averages are over the tasks of that language that every run with downstream scores has
  (listed in the table's notes), so the averages compare like with like.
- long context (python -m fm_pretrain.eval.long_context, logged into the run at a checkpoint's step): per language,
  the loss-so-far against context length L (`long_context/<lang>/loss_so_far/<L>`) of the run's latest evaluated
  step (the lengths of one evaluation, never mixed with an earlier checkpoint's); the table's column is the value at
  L*, the longest length that every run with that language's metrics logged. Retrieval accuracy against prompt
  length (`retrieval/<task>/acc/<L>`, python -m fm_pretrain.eval.retrieval) likewise, for the plot.

A value a run did not log is None (a blank cell) and counted per column in `Table.missing`; a value that does not
apply (m, k, tau of a model without FM layers) is `NA`.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import names
from .history import History, Series, long_context_keys, retrieval_keys, router_layer_keys
from .select import CompareError, RunRecord

NA = "n/a"  # not applicable (not counted as missing)
PRIMARY_FALLBACK = ("acc_norm", "acc", "exact_match", "char_f1", "f1", "em")


# ----------------------------------------------------------------------------------------------------------
# Per-run curves


@dataclass
class Curve:
    """x (tokens, hours or FLOPs) against y, sorted by x."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class RunCurves:
    run: RunRecord
    label: str
    val_tokens: Curve | None = None
    val_hours: Curve | None = None
    val_flops: Curve | None = None
    train_loss: Curve | None = None  # against tokens (step when tokens are unknown: see x_is_steps)
    throughput: Curve | None = None
    mfu: Curve | None = None
    router: dict[str, Curve] = field(default_factory=dict)  # stat -> mean over layers against tokens
    router_layers: dict[str, dict[int, float]] = field(default_factory=dict)  # stat -> {layer: latest value}
    downstream: dict[str, tuple[str, float]] = field(default_factory=dict)  # task -> (primary metric, value)
    tokens_seen: float | None = None
    device_hours: float | None = None
    x_is_steps: bool = False  # no way to know tokens: curves are against steps
    # offline evaluations at the latest evaluated step: lang -> loss-so-far against context length (tokens),
    # task -> retrieval accuracy against prompt length; and that step
    long_context: dict[str, Curve] = field(default_factory=dict)
    long_context_step: dict[str, int] = field(default_factory=dict)
    retrieval: dict[str, Curve] = field(default_factory=dict)
    retrieval_step: dict[str, int] = field(default_factory=dict)


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int_param(run: RunRecord, key: str) -> int | None:
    f = _float(run.params.get(key))
    return int(f) if f is not None else None


def layer_pattern(run: RunRecord) -> str | None:
    """The layer pattern, comma-joined: tag `layer_pattern`, else param `model.layer_pattern` (a list's repr)."""
    tag = run.tags.get(names.T_LAYER_PATTERN)
    if tag:
        return ",".join(p.strip() for p in tag.split(",") if p.strip())
    raw = run.params.get(names.P_LAYER_PATTERN)
    if not raw:
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw.strip("[]").replace(" ", "").replace("'", "")
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def has_fm(run: RunRecord) -> bool:
    pattern = layer_pattern(run)
    return pattern is not None and "fm" in pattern.split(",")


def _tokens_fn(run: RunRecord, hist: History) -> Callable[[np.ndarray], np.ndarray] | None:
    """step -> tokens for this run (see the module docstring), or None when nothing tells."""
    series = hist.get(names.TOKENS)
    scale = 1.0
    if series is None or not len(series.finite()):
        series = hist.get(names.CONSUMED_SAMPLES)
        seq_len = _int_param(run, names.P_SEQ_LEN)
        scale = float(seq_len) if seq_len else float("nan")
    if series is not None and len(series.finite()) and math.isfinite(scale):
        s = series.finite()
        steps, tokens = s.steps.astype(np.float64), s.values * scale
        if steps[0] > 0:
            steps, tokens = np.concatenate([[0.0], steps]), np.concatenate([[0.0], tokens])
        last_step, last_tokens = steps[-1], tokens[-1]

        def from_series(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            out = np.interp(x, steps, tokens)
            beyond = x > last_step
            if beyond.any() and last_step > 0:  # past the last logged step: the last rate
                out[beyond] = x[beyond] * (last_tokens / last_step)
            return out

        return from_series
    seq_len, micro = _int_param(run, names.P_SEQ_LEN), _int_param(run, names.P_MICRO_BATCH)
    accum, world = _int_param(run, names.P_GRAD_ACCUM) or 1, _float(run.tags.get(names.T_WORLD_SIZE))
    tp = _int_param(run, names.P_TP) or 1
    if seq_len and micro and world:
        per_step = micro * accum * max(1, int(world) // tp) * seq_len
        return lambda x: np.asarray(x, dtype=np.float64) * per_step
    return None


def _median_rate(curve: Curve | None) -> float | None:
    """Median of a per-window rate, leaving out the first window (start-up) when there are more."""
    if curve is None:
        return None
    v = curve.y[np.isfinite(curve.y)]
    if len(v) > 1:
        v = v[1:]
    return float(np.median(v)) if len(v) else None


def downstream_scores(latest: dict[str, float]) -> dict[str, tuple[str, float]]:
    """{task: (primary metric, latest value)} from `downstream/...` keys, else the older `eval/...` keys."""
    from fm_pretrain.eval.tasks import TASKS

    by_task: dict[str, dict[str, float]] = {}
    for prefix in reversed(names.DOWNSTREAM_PREFIXES):  # the first prefix wins: written last
        for key, value in latest.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == prefix and math.isfinite(value):
                by_task.setdefault(parts[1], {})[parts[2]] = value
    out = {}
    for task, metrics in by_task.items():
        primary = TASKS[task].primary if task in TASKS else None
        if primary not in metrics:
            primary = next((m for m in PRIMARY_FALLBACK if m in metrics), None)
        if primary is None:
            plain = sorted(m for m in metrics if not m.endswith("_stderr"))
            primary = plain[0] if plain else None
        if primary is not None:
            out[task] = (primary, metrics[primary])
    return out


def latest_by_length(hist: History, keys: dict[str, tuple[str, int]]) -> dict[str, tuple[int, Curve]]:
    """{group: (step, Curve(lengths, values))} from per-length keys ({key: (group, length)}): per group (language,
    task), the finite values logged at the latest step any of its keys has, sorted by length."""
    by_group: dict[str, list[tuple[int, Series]]] = {}
    for key, (group, length) in keys.items():
        s = hist.get(key)
        if s is not None and len(s.finite()):
            by_group.setdefault(group, []).append((length, s.finite()))
    out = {}
    for group, items in by_group.items():
        step = max(int(s.steps.max()) for _, s in items)
        points = sorted((length, float(s.values[s.steps == step][-1])) for length, s in items if step in s.steps)
        x = np.array([p[0] for p in points], dtype=np.float64)
        out[group] = (step, Curve(x, np.array([p[1] for p in points], dtype=np.float64)))
    return out


def derive_curves(run: RunRecord, hist: History, label: str) -> RunCurves:
    """The curves and single numbers of one run."""
    c = RunCurves(run=run, label=label)
    to_tokens = _tokens_fn(run, hist)
    c.x_is_steps = to_tokens is None
    x_of = to_tokens or (lambda s: np.asarray(s, dtype=np.float64))
    fpt = _float(run.params.get(names.P_FLOPS_PER_TOKEN))
    val = hist.get(names.VAL_LOSS)
    if val is not None and len(val.finite()):
        v = val.finite()
        tokens = x_of(v.steps)
        c.val_tokens = Curve(tokens, v.values)
        if run.start_ms is not None:
            c.val_hours = Curve((v.times_ms - run.start_ms) / 3.6e6, v.values)
        if fpt is not None and not c.x_is_steps:
            c.val_flops = Curve(tokens * fpt, v.values)
    for key, attr in ((names.TRAIN_LOSS, "train_loss"), (names.TOKENS_PER_S, "throughput"), (names.MFU, "mfu")):
        s = hist.get(key)
        if s is not None and len(s.finite()):
            s = s.finite()
            setattr(c, attr, Curve(x_of(s.steps), s.values))
    for stat in names.ROUTER_STATS:
        s = hist.get(f"{names.ROUTER_MEAN_PREFIX}/{stat}")
        if s is not None and len(s.finite()):
            c.router[stat] = Curve(x_of(s.finite().steps), s.finite().values)
    for key, stat in router_layer_keys(list(run.latest)).items():  # router/layer<i>/<stat>: latest per layer
        if math.isfinite(run.latest[key]):
            c.router_layers.setdefault(stat, {})[int(key.split("/")[1][len("layer") :])] = run.latest[key]
    c.downstream = downstream_scores(run.latest)
    for lang, (step, curve) in latest_by_length(hist, long_context_keys(list(hist))).items():
        c.long_context[lang], c.long_context_step[lang] = curve, step
    for task, (step, curve) in latest_by_length(hist, retrieval_keys(list(hist))).items():
        c.retrieval[task], c.retrieval_step[task] = curve, step

    # tokens seen: the logged count, else the token count of the last training step
    if names.TOKENS in run.latest and math.isfinite(run.latest[names.TOKENS]):
        c.tokens_seen = run.latest[names.TOKENS]
    elif to_tokens is not None:
        last = [hist[k].steps.max() for k in names.TRAINING_KEYS if k in hist and len(hist[k])]
        c.tokens_seen = float(to_tokens(np.array([max(last)]))[0]) if last else None
    world = _float(run.tags.get(names.T_WORLD_SIZE))
    ends = [int(hist[k].times_ms.max()) for k in names.TRAINING_KEYS if k in hist and len(hist[k])]
    if world and ends and run.start_ms is not None:
        c.device_hours = world * max(0, max(ends) - run.start_ms) / 3.6e6
    return c


def human(n: float | None) -> str:
    """1234567 -> '1.23M' (K, M, B, T)."""
    if n is None:
        return ""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def labels_for(runs: Sequence[RunRecord]) -> list[str]:
    """Legend labels: the run names, with the id's start added where names repeat."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    return [r.name if counts[r.name] == 1 else f"{r.name} ({r.run_id[:6]})" for r in runs]


# ----------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Column:
    key: str  # CSV header and sort key
    header: str  # Markdown / terminal / HTML header
    kind: str  # how report.py formats it: text, id, count, float, loss, rate, pct, hours, score
    terminal: bool = True  # shown in the terminal table (per-task scores are left to the files)


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict[str, Any]]
    matched_tokens: float | None
    missing: dict[str, list[str]]  # column key -> labels of the runs with a blank there
    notes: list[str]
    tasks: dict[str, list[str]]  # "en"/"ja" -> the tasks in that average
    # language -> L*, the context length of its long-context column (None: the runs have no length in common);
    # only the languages some run has long-context metrics of
    long_context_lengths: dict[str, int | None] = field(default_factory=dict)

    def column(self, key: str) -> Column:
        return next(c for c in self.columns if c.key == key)


BASE_COLUMNS = [
    Column("run", "run", "text"),
    Column("run_id", "run id", "id"),
    Column("experiment", "experiment", "text", terminal=False),
    Column("model_type", "model", "text"),
    Column("n_params", "params", "count"),
    Column("layer_pattern", "layers", "text"),
    Column("m", "m", "text"),
    Column("k", "k", "text"),
    Column("tau", "tau", "text"),
    Column("tokens", "tokens", "count"),
    Column("val_loss_final", "val loss (final)", "loss"),
    Column("val_loss_best", "val loss (best)", "loss"),
    Column("val_loss_matched", "val loss @ matched", "loss"),
    Column("tokens_per_s", "tokens/s", "rate"),
    Column("mfu", "MFU", "pct"),
    Column("device_hours", "device-h", "hours"),
    Column("downstream_en", "EN avg", "score"),
    Column("downstream_ja", "JA avg", "score"),
]
STATUS = Column("status", "status", "text")
LONG_CONTEXT_COLUMNS = {lang: f"long_context_{lang}" for lang in names.LONG_CONTEXT_LANGS}  # lang -> column key
SORT_KEYS = tuple(c.key for c in BASE_COLUMNS) + tuple(LONG_CONTEXT_COLUMNS.values()) + ("status",)


def context_length(n: int) -> str:
    """4096 -> '4K', 131072 -> '128K' (K = 1024, as the long-context evaluation reports), 3000 -> '3000'."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def common_length(curves: Sequence[Curve]) -> int | None:
    """The longest context length logged in every one of the curves (None when they share none)."""
    if not curves:
        return None
    common = set.intersection(*({int(x) for x in c.x} for c in curves))
    return max(common) if common else None


def value_at_length(curve: Curve | None, length: int | None) -> float | None:
    """The curve's value logged at exactly `length` (no interpolation), else None."""
    if curve is None or length is None:
        return None
    hit = np.flatnonzero(curve.x == float(length))
    return float(curve.y[hit[0]]) if len(hit) else None


def interpolate_at(curve: Curve | None, x: float | None) -> float | None:
    """y at x by linear interpolation (None outside the curve's x range or without a curve)."""
    if curve is None or x is None or not len(curve.x):
        return None
    order = np.argsort(curve.x, kind="stable")
    xs, ys = curve.x[order], curve.y[order]
    if x < xs[0] - 1e-9 * max(1.0, abs(xs[0])) or x > xs[-1] + 1e-9 * max(1.0, abs(xs[-1])):
        return None
    return float(np.interp(x, xs, ys))


def matched_tokens(curves: Sequence[RunCurves]) -> float | None:
    """The largest token count every run with validation losses reached (None when none has any)."""
    ends = [float(c.val_tokens.x.max()) for c in curves if c.val_tokens is not None and not c.x_is_steps]
    return min(ends) if ends else None


def _fm_value(run: RunRecord, key: str) -> Any:
    if not has_fm(run):
        return NA
    raw = run.params.get(key)
    if raw is None:
        return None
    if key == names.P_K:
        m = _int_param(run, names.P_M)
        k = _float(raw)
        return "dense" if k is None or (m is not None and k >= m) else str(int(k))
    f = _float(raw)
    return (str(int(f)) if f == int(f) and key == names.P_M else f"{f:g}") if f is not None else raw


def build_table(curves: Sequence[RunCurves], sort: str = "val_loss_matched") -> Table:
    """The comparison table of the runs' curves, sorted by `sort` (ascending; blanks last)."""
    if sort not in SORT_KEYS:
        raise CompareError(f"--sort {sort!r}: choose from {', '.join(SORT_KEYS)}")
    t_star = matched_tokens(curves)
    with_scores = [c for c in curves if c.downstream]
    tasks_by_lang: dict[str, list[str]] = {}
    all_tasks: list[str] = []
    from fm_pretrain.eval.tasks import GROUPS, TASKS

    for c in with_scores:
        all_tasks += [t for t in c.downstream if t not in all_tasks]
    order = {t: i for i, t in enumerate(TASKS)}
    all_tasks.sort(key=lambda t: (order.get(t, len(order)), t))
    for lang in ("en", "ja"):
        group = [t for t in GROUPS.get(lang, []) if all(t in c.downstream for c in with_scores)]
        tasks_by_lang[lang] = group if with_scores else []
    task_cols = [Column(f"task:{t}", f"{t} ({_primary(with_scores, t)})", "score", terminal=False) for t in all_tasks]
    lc_lengths = {
        lang: common_length([c.long_context[lang] for c in curves if lang in c.long_context])
        for lang in names.LONG_CONTEXT_LANGS
        if any(lang in c.long_context for c in curves)
    }
    lc_cols = [Column(LONG_CONTEXT_COLUMNS[lang], f"{lang.upper()} loss-so-far", "loss") for lang in lc_lengths]
    columns = [*BASE_COLUMNS, *lc_cols, *task_cols, STATUS]

    rows = []
    for c in curves:
        r = c.run
        val = c.val_tokens
        row: dict[str, Any] = {
            "run": c.label,
            "run_id": r.run_id,
            "experiment": r.experiment,
            "model_type": r.tags.get(names.T_MODEL_TYPE),
            "n_params": _float(r.params.get(names.P_N_PARAMS)),
            "layer_pattern": layer_pattern(r),
            "m": _fm_value(r, names.P_M),
            "k": _fm_value(r, names.P_K),
            "tau": _fm_value(r, names.P_TAU),
            "tokens": c.tokens_seen,
            "val_loss_final": float(val.y[np.argmax(val.x)]) if val is not None else None,
            "val_loss_best": float(val.y.min()) if val is not None else None,
            "val_loss_matched": interpolate_at(val, t_star) if not c.x_is_steps else None,
            "tokens_per_s": _median_rate(c.throughput),
            "mfu": _median_rate(c.mfu),
            "device_hours": c.device_hours,
        }
        for lang in ("en", "ja"):
            tasks = tasks_by_lang[lang]
            row[f"downstream_{lang}"] = float(np.mean([c.downstream[t][1] for t in tasks])) if (
                tasks and c.downstream) else None  # fmt: skip
        for lang, length in lc_lengths.items():
            row[LONG_CONTEXT_COLUMNS[lang]] = value_at_length(c.long_context.get(lang), length)
        for t in all_tasks:
            row[f"task:{t}"] = c.downstream[t][1] if t in c.downstream else None
        row["status"] = r.status
        rows.append(row)

    def sort_key(row: dict[str, Any]):
        v = row.get(sort)
        blank = v is None or v == NA
        return (blank, v if isinstance(v, int | float) else str(v or "") if not blank else 0, row["run"])

    rows.sort(key=sort_key)
    missing: dict[str, list[str]] = {}
    for col in columns:
        if col.key in ("downstream_en", "downstream_ja") and not tasks_by_lang[col.key[-2:]]:
            continue  # no task of that language in common: nothing to average, for every run
        blanks = [row["run"] for row in rows if row.get(col.key) is None]
        if blanks:
            missing[col.key] = blanks
    notes = _notes(curves, t_star, tasks_by_lang) + _long_context_notes(curves, lc_lengths)
    return Table(columns, rows, t_star, missing, notes, tasks_by_lang, long_context_lengths=lc_lengths)


def _primary(curves: Sequence[RunCurves], task: str) -> str:
    metrics = sorted({c.downstream[task][0] for c in curves if task in c.downstream})
    return "/".join(metrics)


def _notes(curves: Sequence[RunCurves], t_star: float | None, tasks: dict[str, list[str]]) -> list[str]:
    with_val = [c for c in curves if c.val_tokens is not None and not c.x_is_steps]
    notes = []
    if t_star is not None:
        notes.append(f"val loss @ matched: interpolated linearly at {human(t_star)} tokens ({t_star:.0f}), the "
                     f"largest token count all {len(with_val)} runs with validation losses reached")  # fmt: skip
    notes.append("tokens/s and MFU: median over the logged windows (the first, with start-up, left out); "
                 "device-h: world_size x wall-clock from run start to the last training metric")  # fmt: skip
    for lang, label in (("en", "EN"), ("ja", "JA")):
        if tasks[lang]:
            notes.append(f"{label} avg: mean primary metric over {len(tasks[lang])} task(s) every run with "
                         f"downstream scores has: {', '.join(tasks[lang])}")  # fmt: skip
    stepped = [c.label for c in curves if c.x_is_steps]
    if stepped:
        notes.append(f"no token count logged (train/tokens, train/consumed_samples + data.seq_len, or the batch "
                     f"params) for {', '.join(stepped)}: curves against steps, no matched-token value")  # fmt: skip
    return notes


def _long_context_notes(curves: Sequence[RunCurves], lengths: dict[str, int | None]) -> list[str]:
    notes = []
    for lang, length in lengths.items():
        n = sum(lang in c.long_context for c in curves)
        label = f"{lang.upper()} loss-so-far"
        if length is None:
            notes.append(f"{label}: the {n} run(s) with {lang.upper()} long-context metrics logged no context length "
                         "in common: blank")  # fmt: skip
            continue
        notes.append(f"{label} @ {context_length(length)} ctx: mean NLL over the first {length} tokens "
                     f"({names.LONG_CONTEXT_PREFIX}/{lang}/{names.LOSS_SO_FAR}/{length}) at each run's latest "
                     f"long-context evaluation; {length}: the longest length logged by every run with "
                     f"{lang.upper()} long-context metrics ({n})")  # fmt: skip
    return notes
