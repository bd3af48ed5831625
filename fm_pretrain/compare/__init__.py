"""Comparing training runs across MLflow stores: `python -m fm_pretrain.compare` (docs/compare.md).

Modules, in the order the CLI uses them:
- `select.py`: stores (sqlite files found under a directory tree, sqlite URIs, an `mlflow server` over http),
  experiments, run ids and MLflow filter strings -> the selected runs with their params, tags and latest metrics;
- `history.py`: the metric histories of the selected runs: one SQL query per sqlite store (read-only), the
  MLflow client for other stores;
- `table.py`: per-run curves (validation loss against tokens, wall-clock and FLOPs, ...) and the comparison
  table, validation loss interpolated at the largest token count all runs reached;
- `plots.py`: the PNGs; `report.py`: Markdown, CSV, terminal table, HTML page, and the comparison MLflow run;
- `cli.py`: the command line (`__main__.py` runs it).

The metric and tag names read here are the ones the trainer logs (fm_pretrain/tracking, fm_pretrain/eval,
fm_pretrain/model/router_stats.py); `names.py` lists them in one place.
"""

from .select import CompareError

__all__ = ["CompareError"]
