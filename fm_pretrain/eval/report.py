"""Results out: the printed table, eval_results.json, the accuracy bar chart, MLflow metrics and artifacts.

MLflow names: metric `downstream/<task>/<metric>` (e.g. `downstream/hellaswag/acc_norm`, `downstream/jsquad/char_f1`,
`downstream/lambada_openai/perplexity`) at the checkpoint's step; artifacts under `downstream/step_<N>/`
(`eval_results.json`, `accuracy.png`). Written into the training run when `RUN_DIR/mlflow_run_id` exists,
else into a new run named `eval-<run dir name>` of the same experiment.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from fm_pretrain.config import TrackingConfig

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
PLOT_FILE = "accuracy.png"
METRIC_PREFIX = "downstream"  # metric keys downstream/<task>/<metric>, artifacts downstream/step_N


def metric_key(task: str, metric: str) -> str:
    return f"{METRIC_PREFIX}/{task}/{metric}"


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{downstream/<task>/<metric>: value} for every computed metric (stderrs included; metrics of tasks with no
    scored item are left out, their counts say why)."""
    out = {}
    for name, res in results["tasks"].items():
        for metric, value in res["metrics"].items():
            if value is not None:
                out[metric_key(name, metric)] = float(value)
    return out


def format_table(results: dict[str, Any]) -> str:
    """A fixed-width table: task, language, primary metric first, then the others, item counts and chance."""
    header = ("task", "lang", "metric", "value", "stderr", "chance", "scored", "skipped", "truncated")
    rows = []
    for name, res in results["tasks"].items():
        c, metrics = res["counts"], res["metrics"]
        names = [res["primary"]] + [m for m in metrics if m != res["primary"] and not m.endswith("_stderr")]
        for j, metric in enumerate(names):
            value, err = metrics.get(metric), metrics.get(f"{metric}_stderr")
            rows.append((
                name if j == 0 else "",
                res["lang"] if j == 0 else "",
                metric,
                "n/a" if value is None else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}",
                "" if err is None else f"{err:.4f}",
                f"{res['chance']:.3f}" if j == 0 and res["kind"] == "choice" else "",
                str(c["scored"]) if j == 0 else "",
                str(sum(c["skipped"].values())) if j == 0 else "",
                str(c["truncated_items"]) if j == 0 else "",
            ))  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    skipped = {n: r["counts"]["skipped"] for n, r in results["tasks"].items() if r["counts"]["skipped"]}
    if skipped:
        lines.append("skipped: " + "; ".join(f"{n}: {s}" for n, s in skipped.items()))
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # never a half-written results file
    return path


def plot_accuracy(results: dict[str, Any], out: Path, title: str) -> Path:
    """One bar per task (its primary metric, perplexity excluded), a red tick at each random-chance baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, values, chance, colours = [], [], [], []
    for name, res in results["tasks"].items():
        value = res["metrics"].get(res["primary"])
        if value is None:
            continue
        names.append(name)
        values.append(value)
        chance.append(res["chance"])
        colours.append("tab:blue" if res["lang"] == "en" else "tab:orange")
    fig = Figure(figsize=(max(6.0, 0.55 * len(names) + 2), 4.2))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no backend switch in the host process
    ax = fig.subplots()
    xs = range(len(names))
    ax.bar(xs, values, color=colours)
    marked = [x for x in xs if chance[x] > 0]  # generation tasks have no chance level to mark
    ax.hlines([chance[x] for x in marked], [x - 0.4 for x in marked], [x + 0.4 for x in marked], colors="red",
              label="random chance")  # fmt: skip
    ax.set_xticks(list(xs), [f"{n}\n({results['tasks'][n]['primary']})" for n in names], rotation=60, ha="right",
                  fontsize=7)  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (blue: English, orange: Japanese)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def log_to_mlflow(
    results: dict[str, Any], run_dir: Path, step: int, tracking: TrackingConfig, tags: dict[str, str] | None = None
) -> str:
    """Log metrics at `step` and the results and chart as artifacts (`downstream/step_<N>/`); returns the run id.

    Through `run_logging.log_offline_eval`: the training run (RUN_DIR/mlflow_run_id) is reopened by id with a plain
    client, its status, params and tags left as they are, so this is safe while training goes on; without one, a
    new run `eval-<run dir name>` is created (its id is not written to run_dir)."""
    from .run_logging import log_offline_eval

    with tempfile.TemporaryDirectory() as tmp:
        files = [
            write_results(results, Path(tmp) / RESULTS_FILE),
            plot_accuracy(results, Path(tmp) / PLOT_FILE, f"{run_dir.resolve().name} step {step}"),
        ]
        return log_offline_eval(
            run_dir,
            tracking,
            step,
            flat_metrics(results),
            files,
            f"{METRIC_PREFIX}/step_{step}",
            kind="eval",
            tags=tags,
        )
