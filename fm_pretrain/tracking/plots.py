"""Plots logged with a run: the loss curves (train and validation) over the learning-rate schedule.

Figure + Agg canvas directly: no pyplot global state, no backend switch for the host process.
"""

from __future__ import annotations

from pathlib import Path

LOSS_KEYS = ("train/loss", "val/loss")
LR_KEYS = ("train/lr", "lr", "optim/lr")  # the first one present is plotted


def dedupe_by_step(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """Last value wins per step: a resumed run re-logs the steps after its last checkpoint."""
    by_step = dict(points)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_loss(history: dict[str, list[tuple[int, float]]], title: str, out: Path) -> Path | None:
    """Loss curves (top) and the learning rate (bottom) from {key: [(step, value), ...]}; None if nothing to plot."""
    loss_keys = [k for k in LOSS_KEYS if history.get(k)]
    lr_key = next((k for k in LR_KEYS if history.get(k)), None)
    if not loss_keys and lr_key is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = int(bool(loss_keys)) + int(lr_key is not None)
    fig = Figure(figsize=(8, 3.2 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    ax_iter = iter(axes)
    if loss_keys:
        ax = next(ax_iter)
        for key in loss_keys:
            steps, values = dedupe_by_step(history[key])
            ax.plot(steps, values, label=key, marker="o" if key.startswith("val/") else None, markersize=3)
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
    if lr_key is not None:
        ax = next(ax_iter)
        steps, values = dedupe_by_step(history[lr_key])
        ax.plot(steps, values, color="tab:green", label=lr_key)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
