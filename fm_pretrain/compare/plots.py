"""The comparison's PNGs (matplotlib Figure + Agg canvas; no pyplot, so no global state in the host process).

One colour per run, the same in every plot. Lines with more than `MAX_POINTS` points are thinned for drawing
(mean per bin for raw rates, every n-th point for smoothed curves); the numbers in the table use all points.
A plot with nothing to show (no run logged its metric) is not written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import names
from .table import Curve, RunCurves, Table, context_length

MAX_POINTS = 2000
MAX_BAR_RUNS = 8  # more runs: the downstream scores as a heatmap
DPI = 110
LINESTYLES = ("-", "--", ":", "-.")
PLOT_FILES = {
    "val_tokens": "val_loss_vs_tokens.png",
    "val_hours": "val_loss_vs_wallclock.png",
    "val_flops": "val_loss_vs_flops.png",
    "train_loss": "train_loss_smoothed.png",
    "throughput": "throughput.png",
    "downstream": "downstream.png",
    "router": "router.png",
    "long_context": "long_context.png",
    "retrieval": "retrieval.png",
}


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _styles(n: int) -> list[dict]:
    """A (colour, linestyle) per run: tab10 up to 10 runs, tab20 beyond, then line styles cycle."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    k = cmap.N
    return [{"color": cmap(i % k), "linestyle": LINESTYLES[(i // k) % len(LINESTYLES)]} for i in range(n)]


def ema(y: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); weight 0 returns y."""
    if weight <= 0 or len(y) == 0:
        return np.asarray(y, dtype=np.float64)
    out = np.empty(len(y))
    last, norm = 0.0, 0.0
    for i, v in enumerate(np.asarray(y, dtype=np.float64)):
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def thin(x: np.ndarray, y: np.ndarray, mean: bool) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_POINTS points: bin means (mean=True) or every n-th point (keeping the last)."""
    n = len(x)
    if n <= MAX_POINTS:
        return x, y
    if not mean:
        idx = np.unique(np.concatenate([np.linspace(0, n - 1, MAX_POINTS).astype(np.int64), [n - 1]]))
        return x[idx], y[idx]
    edges = np.linspace(0, n, MAX_POINTS + 1).astype(np.int64)
    counts = np.diff(edges)
    return np.add.reduceat(x, edges[:-1]) / counts, np.add.reduceat(y, edges[:-1]) / counts


def _legend(fig, axes, n: int) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        return
    if n <= 8:
        axes[0].legend(fontsize=8)
    else:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=7,
                   ncol=1 if n <= 25 else 2)  # fmt: skip
        fig.subplots_adjust(right=0.78)


def _xlabel(curves: Sequence[RunCurves], what: str = "tokens") -> str:
    return "steps (no token count logged)" if all(c.x_is_steps for c in curves) else what


def _eng(ax, axis: str = "x") -> None:
    from matplotlib.ticker import EngFormatter

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(EngFormatter(sep=""))


def _clip_start(ax, curves: list[Curve]) -> None:
    """Keep an untrained model's first loss (far above the rest) from flattening the curves."""
    rest = [c.y[1:] for c in curves if len(c.y) > 1]
    if not rest:
        return
    ys = np.concatenate(rest)
    lo, hi = float(ys.min()), float(ys.max())
    span = max(hi - lo, 1e-6)
    if any(len(c.y) and c.y[0] > hi + span for c in curves):
        ax.set_ylim(lo - 0.05 * span, hi + 0.3 * span)


def _finish(fig, out: Path) -> Path:
    fig.tight_layout(rect=(0, 0, 0.80, 1) if fig.legends else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")  # "tight": a long legend beside the axes stays in the image
    return out


def plot_val_loss(curves: Sequence[RunCurves], styles: list[dict], which: str, out: Path, t_star: float | None):
    """Validation loss against tokens, wall-clock hours or FLOPs (which: val_tokens, val_hours, val_flops)."""
    have = [(c, s) for c, s in zip(curves, styles, strict=True) if getattr(c, which) is not None]
    if not have:
        return None
    wide = len(have) > 8
    fig, axes = _figure(10 if wide else 7.5, 4.5)
    ax = axes[0, 0]
    for c, style in have:
        curve = getattr(c, which)
        marker = "o" if len(curve.x) <= 50 else None  # dots for a few validation points, not for hundreds
        ax.plot(curve.x, curve.y, marker=marker, markersize=3, label=c.label, **style)
    xlabel = {"val_tokens": _xlabel(curves), "val_hours": "wall-clock (hours since the run started)",
              "val_flops": "training FLOPs (tokens x flops_per_token)"}[which]  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    if which != "val_hours":
        _eng(ax)
    if which == "val_tokens" and t_star is not None:
        ax.axvline(t_star, color="grey", linewidth=0.8, linestyle=":", label="matched tokens")
    missing = len(curves) - len(have)
    title = {"val_tokens": "validation loss vs tokens", "val_hours": "validation loss vs wall-clock",
             "val_flops": "validation loss vs compute"}[which]  # fmt: skip
    if missing:
        title += f" ({missing} run(s) without {'flops_per_token' if which == 'val_flops' else 'this'} left out)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _clip_start(ax, [getattr(c, which) for c, _ in have])
    _legend(fig, [ax], len(have))
    return _finish(fig, out)


def plot_train_loss(curves: Sequence[RunCurves], styles: list[dict], smoothing: float, out: Path):
    have = [(c, s) for c, s in zip(curves, styles, strict=True) if c.train_loss is not None]
    if not have:
        return None
    fig, axes = _figure(10 if len(have) > 8 else 7.5, 4.5)
    ax = axes[0, 0]
    for c, style in have:
        x, y = thin(c.train_loss.x, ema(c.train_loss.y, smoothing), mean=False)
        ax.plot(x, y, label=c.label, linewidth=1.2, **style)
    ax.set_xlabel(_xlabel(curves))
    ax.set_ylabel(f"training loss (EMA smoothing {smoothing:g})")
    _eng(ax)
    ax.set_title("smoothed training loss", fontsize=10)
    ax.grid(alpha=0.3)
    _clip_start(ax, [Curve(c.train_loss.x, ema(c.train_loss.y, smoothing)) for c, _ in have])
    _legend(fig, [ax], len(have))
    return _finish(fig, out)


def plot_throughput(curves: Sequence[RunCurves], styles: list[dict], out: Path):
    have = [(c, s) for c, s in zip(curves, styles, strict=True) if c.throughput is not None]
    if not have:
        return None
    with_mfu = [(c, s) for c, s in have if c.mfu is not None]
    rows = 2 if with_mfu else 1
    fig, axes = _figure(10 if len(have) > 8 else 7.5, 3.6 * rows + 0.4, rows=rows)
    ax = axes[0, 0]
    for c, style in have:
        x, y = thin(c.throughput.x, c.throughput.y, mean=True)
        ax.plot(x, y, label=c.label, linewidth=1.0, **style)
    ax.set_ylabel("tokens/s (all ranks)")
    ax.set_title("throughput", fontsize=10)
    _eng(ax, "y")
    for row in range(rows):
        _eng(axes[row, 0])
        axes[row, 0].grid(alpha=0.3)
    if with_mfu:
        ax2 = axes[1, 0]
        for c, style in with_mfu:
            x, y = thin(c.mfu.x, c.mfu.y * 100, mean=True)
            ax2.plot(x, y, linewidth=1.0, **style)
        ax2.set_ylabel("MFU (%)")
    axes[-1, 0].set_xlabel(_xlabel(curves))
    _legend(fig, [ax], len(have))
    return _finish(fig, out)


def plot_downstream(curves: Sequence[RunCurves], styles: list[dict], table: Table, out: Path):
    """Each task's primary metric (and the EN/JA averages) per run: grouped bars (one bar per run) for up to
    MAX_BAR_RUNS runs, else a heatmap (run x task) with the values written in the cells."""
    have = [(c, s) for c, s in zip(curves, styles, strict=True) if c.downstream]
    if not have:
        return None
    from fm_pretrain.eval.tasks import TASKS

    tasks = [col.key[5:] for col in table.columns if col.key.startswith("task:")]
    langs = [lang for lang in ("en", "ja") if table.tasks.get(lang)]
    groups = [*tasks, *(f"{lang.upper()} avg" for lang in langs)]
    ticks = [f"{g} ({TASKS[g].lang})" if g in TASKS else g for g in groups]
    by_label = {row["run"]: row for row in table.rows}
    values = np.array([
        [c.downstream[t][1] if t in c.downstream else np.nan for t in tasks]
        + [by_label.get(c.label, {}).get(f"downstream_{lang}") or np.nan for lang in langs]
        for c, _ in have
    ], dtype=np.float64)  # fmt: skip
    n = len(have)
    if n > MAX_BAR_RUNS:
        fig, axes = _figure(min(30.0, 3.0 + 0.75 * len(groups)), min(40.0, 1.5 + 0.28 * n))
        ax = axes[0, 0]
        img = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", interpolation="nearest")
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < np.nanmean(
                    values) else "black")  # fmt: skip
        ax.set_yticks(range(n), [c.label for c, _ in have], fontsize=7)
        ax.set_xticks(range(len(groups)), ticks, rotation=60, ha="right", fontsize=7)
        fig.colorbar(img, ax=ax, label="score (each task's primary metric)", shrink=0.6)
        ax.set_title("downstream scores per task (blank: not evaluated)", fontsize=10)
        return _finish(fig, out)
    width = 0.8 / n
    fig, axes = _figure(max(8.0, 0.12 * n * len(groups) + 3), 4.8)
    ax = axes[0, 0]
    for i, (c, style) in enumerate(have):
        xs = np.arange(len(groups)) + (i - (n - 1) / 2) * width
        ax.bar(xs, values[i], width=width, color=style["color"], label=c.label)
    ax.set_xticks(range(len(groups)), ticks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("score (each task's primary metric)")
    ax.set_title("downstream scores per task", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, [ax], n)
    return _finish(fig, out)


def plot_router(curves: Sequence[RunCurves], styles: list[dict], out: Path):
    """Per statistic: the mean over layers against tokens (left) and the latest value per layer (right)."""
    have = [(c, s) for c, s in zip(curves, styles, strict=True) if c.router or c.router_layers]
    if not have:
        return None
    from matplotlib.ticker import MaxNLocator

    stats = [s for s in names.ROUTER_STATS if any(s in c.router or s in c.router_layers for c, _ in have)]
    fig, axes = _figure(11, 2.6 * len(stats) + 0.6, rows=len(stats), cols=2)
    for r, stat in enumerate(stats):
        left, right = axes[r, 0], axes[r, 1]
        for c, style in have:
            if stat in c.router:
                x, y = thin(c.router[stat].x, c.router[stat].y, mean=True)
                left.plot(x, y, label=c.label, linewidth=1.0, **style)
            if stat in c.router_layers:
                layers = sorted(c.router_layers[stat])
                right.plot(layers, [c.router_layers[stat][i] for i in layers], marker="o", markersize=3,
                           label=c.label if stat not in c.router else None, **style)  # fmt: skip
        left.set_ylabel(stat.replace("_", " "))
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        _eng(left)
        left.grid(alpha=0.3)
        right.grid(alpha=0.3)
    axes[0, 0].set_title("mean over FM layers", fontsize=10)
    axes[0, 1].set_title("per layer, latest window", fontsize=10)
    axes[-1, 0].set_xlabel(_xlabel(curves))
    axes[-1, 1].set_xlabel("layer")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=7)
        fig.subplots_adjust(right=0.78)
    return _finish(fig, out)


def _length_axis(ax, lengths: Sequence[float]) -> None:
    """Log-2 x axis of context lengths, ticked at the logged lengths (1K, 2K, ..., as the evaluations report)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted({int(x) for x in lengths})
    if len(ticks) > 12:  # at most 12 labels, so they do not overlap
        ticks = ticks[:: -(-len(ticks) // 12)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: context_length(round(v))))
    ax.tick_params(axis="x", labelsize=8)


def _figure_legend(fig, axes) -> None:
    """One legend for all panels (labels first seen first), beside them."""
    handles: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=7)
        fig.subplots_adjust(right=0.78)


def plot_long_context(curves: Sequence[RunCurves], styles: list[dict], table: Table, out: Path):
    """Per language (EN, JA: one panel each), the loss-so-far against context length of each run's latest
    long-context evaluation; the length of the table's column (L*) and the runs' training lengths marked."""
    have = [(c, s) for c, s in zip(curves, styles, strict=True) if c.long_context]
    if not have:
        return None
    langs = [lang for lang in names.LONG_CONTEXT_LANGS if any(lang in c.long_context for c, _ in have)]
    fig, axes = _figure(5.2 * len(langs) + 2.2, 4.4, cols=len(langs))
    panels = list(axes[0])
    for ax, lang in zip(panels, langs, strict=True):
        lengths: list[float] = []
        for c, style in have:
            if lang in c.long_context:
                curve = c.long_context[lang]
                ax.plot(curve.x, curve.y, marker="o", markersize=3, linewidth=1.2, label=c.label, **style)
                lengths += curve.x.tolist()
        train = sorted({int(v) for c, _ in have if lang in c.long_context
                        and (v := c.run.params.get(names.P_SEQ_LEN, "")).isdigit()})  # fmt: skip
        for i, n in enumerate(train):
            ax.axvline(n, color="grey", linewidth=0.8, linestyle="--", label="training length" if i == 0 else None)
        star = table.long_context_lengths.get(lang)
        if star is not None:
            ax.axvline(star, color="black", linewidth=0.8, linestyle=":", label="table column's length")
        _length_axis(ax, lengths + train)
        n_without = len(curves) - sum(lang in c.long_context for c in curves)
        title = f"{lang.upper()}: loss so far vs context length"
        ax.set_title(title + (f" ({n_without} run(s) without, left out)" if n_without else ""), fontsize=10)
        ax.set_xlabel("context length L (tokens)")
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("loss so far (mean NLL over the first L tokens)")
    _figure_legend(fig, panels)
    return _finish(fig, out)


def plot_retrieval(curves: Sequence[RunCurves], styles: list[dict], out: Path):
    """Per retrieval task (one panel each), the accuracy (mean over depths) against prompt length of each run's
    latest retrieval evaluation."""
    have = [(c, s) for c, s in zip(curves, styles, strict=True) if c.retrieval]
    if not have:
        return None
    known = ("passkey", "needle_en", "needle_ja")  # fm_pretrain.eval.retrieval.TASKS, then any other, by name
    found = {t for c, _ in have for t in c.retrieval}
    tasks = [t for t in known if t in found] + sorted(found - set(known))
    fig, axes = _figure(4.6 * len(tasks) + 2.2, 4.2, cols=len(tasks))
    panels = list(axes[0])
    for ax, task in zip(panels, tasks, strict=True):
        lengths: list[float] = []
        for c, style in have:
            if task in c.retrieval:
                curve = c.retrieval[task]
                ax.plot(curve.x, curve.y, marker="o", markersize=3, linewidth=1.2, label=c.label, **style)
                lengths += curve.x.tolist()
        _length_axis(ax, lengths)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task}: accuracy vs length", fontsize=10)
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("retrieval accuracy (mean over depths)")
    _figure_legend(fig, panels)
    return _finish(fig, out)


def write_plots(
    curves: Sequence[RunCurves], table: Table, out_dir: Path, smoothing: float = 0.9, progress: bool = False
) -> dict[str, Path]:
    """Every plot that has data, as {name: path} (names as in PLOT_FILES)."""
    from tqdm import tqdm

    styles = _styles(len(curves))
    jobs = {
        "val_tokens": lambda p: plot_val_loss(curves, styles, "val_tokens", p, table.matched_tokens),
        "val_hours": lambda p: plot_val_loss(curves, styles, "val_hours", p, None),
        "val_flops": lambda p: plot_val_loss(curves, styles, "val_flops", p, None),
        "train_loss": lambda p: plot_train_loss(curves, styles, smoothing, p),
        "throughput": lambda p: plot_throughput(curves, styles, p),
        "downstream": lambda p: plot_downstream(curves, styles, table, p),
        "router": lambda p: plot_router(curves, styles, p),
        "long_context": lambda p: plot_long_context(curves, styles, table, p),
        "retrieval": lambda p: plot_retrieval(curves, styles, p),
    }
    written = {}
    for name, job in tqdm(jobs.items(), desc="plots", unit="plot", disable=not progress):
        path = job(out_dir / PLOT_FILES[name])
        if path is not None:
            written[name] = path
    return written
