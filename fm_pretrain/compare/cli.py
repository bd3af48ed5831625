"""`python -m fm_pretrain.compare` (also `fm-compare`): compare training runs across MLflow stores.

    python -m fm_pretrain.compare --store runs/ --experiment fm-pretrain-1b
    python -m fm_pretrain.compare --store http://mlflow-host:5000 --experiment study \\
        --filter "params.\\`model.fm.top_k\\` = '32'" --out runs/compare/topk32
    python -m fm_pretrain.compare --store runs/a/mlflow.db --store runs/b/mlflow.db --run ID1 --run ID2

Prints the table, writes table.md / table.csv / table.txt / report.html / summary.json and plots/*.png to
--out, and logs that folder as the artifacts of a new run tagged kind=comparison in the compared runs'
experiment (--no-mlflow to skip). Exit status 2 on bad input (unknown store, experiment or run id, bad filter:
the message lists what exists). See docs/compare.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .select import CompareError, resolve_stores

DEFAULT_OUT_ROOT = Path("runs") / "compare"


@dataclass
class CompareOptions:
    """The validated command line; `validate` raises CompareError naming the option."""

    stores: list[str] = field(default_factory=list)
    experiments: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    filter: str = ""
    out: str = ""
    sort: str = "val_loss_matched"
    smoothing: float = 0.9
    mlflow: bool = True
    log_store: str = ""
    log_experiment: str = ""
    include_comparisons: bool = False
    title: str = ""
    progress: bool = True

    def validate(self) -> CompareOptions:
        from .table import SORT_KEYS

        if not 0 <= self.smoothing < 1:
            raise CompareError(f"--smoothing: must be in [0, 1), got {self.smoothing}")
        if self.sort not in SORT_KEYS:
            raise CompareError(f"--sort {self.sort!r}: choose from {', '.join(SORT_KEYS)}")
        for rid in self.run_ids:
            if not rid.strip() or any(c.isspace() for c in rid):
                raise CompareError(f"--run {rid!r}: not a run id")
        if self.log_store and not self.mlflow:
            raise CompareError("--log-store: given together with --no-mlflow")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise CompareError(f"--out {self.out}: exists and is not a directory")
        return self


def parse_args(argv: list[str] | None) -> CompareOptions:
    p = argparse.ArgumentParser(prog="python -m fm_pretrain.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--store", action="append", default=[], metavar="DIR|FILE|URI",
                   help="a directory (every mlflow.db below it), a sqlite file, or a tracking URI; repeatable "
                   "(default: $MLFLOW_TRACKING_URI, else runs/)")  # fmt: skip
    p.add_argument("--experiment", action="append", default=[], metavar="NAME", help="repeatable")
    p.add_argument("--run", action="append", default=[], metavar="RUN_ID", help="repeatable")
    p.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"tags.model_type = 'fm'\"")
    p.add_argument("--out", default="", help=f"report folder (default: {DEFAULT_OUT_ROOT}/<name>-<date>)")
    p.add_argument("--sort", default="val_loss_matched", help="table column to sort by (ascending)")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA weight of the training-loss plot, in [0, 1)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the comparison run")
    p.add_argument("--log-store", default="", help="store of the comparison run (default: the first run's)")
    p.add_argument("--log-experiment", default="", help="its experiment (default: the first run's)")
    p.add_argument("--include-comparisons", action="store_true", help="also compare runs tagged kind=comparison")
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    stores = a.store or ([os.environ["MLFLOW_TRACKING_URI"]] if os.environ.get("MLFLOW_TRACKING_URI") else
                         (["runs"] if Path("runs").is_dir() else []))  # fmt: skip
    return CompareOptions(
        stores=stores, experiments=a.experiment, run_ids=a.run, filter=a.filter, out=a.out, sort=a.sort,
        smoothing=a.smoothing, mlflow=not a.no_mlflow, log_store=a.log_store, log_experiment=a.log_experiment,
        include_comparisons=a.include_comparisons, title=a.title, progress=not a.no_progress,
    )  # fmt: skip


@dataclass
class CompareResult:
    table: object  # table.Table
    out_dir: Path
    files: dict[str, Path]
    plots: dict[str, Path]
    run_id: str | None
    terminal: str


def run_compare(opts: CompareOptions) -> CompareResult:
    """Select, read, tabulate, plot, write and (unless opts.mlflow is false) log; raises CompareError."""
    from .history import read_histories
    from .plots import write_plots
    from .report import log_comparison, render_markdown, render_terminal, write_report
    from .select import select_runs
    from .table import build_table, derive_curves, labels_for

    opts.validate()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # an unreachable server fails in seconds
    stores = resolve_stores(opts.stores)
    selection = select_runs(stores, opts.experiments, opts.run_ids, opts.filter, opts.include_comparisons)
    runs = selection.runs
    histories = read_histories(runs, progress=opts.progress)
    curves = [derive_curves(r, histories.get(r.run_id, {}), label)
              for r, label in zip(runs, labels_for(runs), strict=True)]  # fmt: skip
    table = build_table(curves, sort=opts.sort)
    rank = {row["run"]: i for i, row in enumerate(table.rows)}
    curves.sort(key=lambda c: rank[c.label])  # plots and their legends in the table's order
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = opts.experiments[0] if len(opts.experiments) == 1 else runs[0].experiment
    name = f"compare-{stamp}"
    out_dir = Path(opts.out) if opts.out else DEFAULT_OUT_ROOT / f"{base}-{stamp}".replace("/", "_")
    title = opts.title or f"{len(runs)} runs of {', '.join(sorted({r.experiment for r in runs}))}"
    plots = write_plots(curves, table, out_dir / "plots", opts.smoothing, progress=opts.progress)
    files = write_report(table, plots, selection, out_dir, title, asdict(opts))
    run_id = None
    if opts.mlflow:
        store = resolve_stores([opts.log_store])[0] if opts.log_store else runs[0].store
        run_id, _ = log_comparison(out_dir, table, runs, store, opts.log_experiment or None, name,
                                   f"# {title}\n\n" + render_markdown(table))  # fmt: skip
    return CompareResult(table, out_dir, files, plots, run_id, render_terminal(table))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        result = run_compare(opts)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.terminal, end="")
    print(f"report: {result.out_dir} ({', '.join(p.name for p in result.files.values())}, "
          f"{len(result.plots)} plot(s) in plots/)")  # fmt: skip
    if result.run_id:
        print(f"MLflow: comparison run {result.run_id} (tag kind=comparison)")
    return 0
