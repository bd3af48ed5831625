"""The comparison's outputs: terminal table, Markdown, CSV, a short HTML page, summary.json, and the MLflow run.

Folder layout (the same under the comparison run's artifacts):

    table.md  table.csv  table.txt  report.html  summary.json  plots/*.png

The comparison run is created in the experiment of the compared runs (the first run's store and experiment
unless told otherwise), named `compare-<date>-<time>`, tagged `kind=comparison` (so the next comparison leaves
it out), with the Markdown table as its description (`mlflow.note.content`, shown in the MLflow UI).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import names
from .select import RunRecord, Selection, Store
from .table import LONG_CONTEXT_COLUMNS, NA, Column, Table, context_length, human

FILES = {"md": "table.md", "csv": "table.csv", "txt": "table.txt", "html": "report.html", "json": "summary.json"}
MAX_TAG_LEN = 8000  # MLflow's limit on a tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)


def clip(text: str, sep: str = "\n", note: str = "\n... (cut; the full table is in table.md)") -> str:
    """text cut at its last `sep` that fits MAX_TAG_LEN characters with `note` appended, when it is longer."""
    if len(text) <= MAX_TAG_LEN:
        return text
    head = text[: MAX_TAG_LEN - len(note)]
    return head[: head.rfind(sep) if sep in head else len(head)] + note


def fmt(value: Any, kind: str, short_id: bool = True) -> str:
    """A cell as text; None (not logged) is blank, NA stays 'n/a'."""
    if value is None:
        return ""
    if value == NA or isinstance(value, str):
        return value[:8] if kind == "id" and short_id else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return {
        "count": human,
        "loss": lambda v: f"{v:.4f}",
        "rate": lambda v: f"{v:,.0f}",
        "pct": lambda v: f"{100 * v:.1f}%",
        "hours": lambda v: f"{v:.3g}",
        "score": lambda v: f"{v:.3f}",
    }.get(kind, lambda v: f"{v:g}")(value)


def _headers(table: Table, columns: Sequence[Column]) -> list[str]:
    lc_length = {LONG_CONTEXT_COLUMNS[lang]: n for lang, n in table.long_context_lengths.items() if n is not None}
    out = []
    for c in columns:
        if c.key == "val_loss_matched" and table.matched_tokens is not None:
            out.append(f"val loss @ {human(table.matched_tokens)} tok")
        elif c.key in lc_length:
            out.append(f"{c.header} @ {context_length(lc_length[c.key])} ctx")
        else:
            out.append(c.header)
    return out


def footer(table: Table) -> list[str]:
    """The notes and the count of blank (not logged) cells per column."""
    lines = list(table.notes)
    if table.missing:
        total = sum(len(v) for v in table.missing.values())
        parts = [f"{table.column(k).header}: {len(v)} ({', '.join(v[:5])}{', ...' if len(v) > 5 else ''})"
                 for k, v in table.missing.items()]  # fmt: skip
        lines.append(f"blank = not logged by the run: {total} cell(s); " + "; ".join(parts))
    else:
        lines.append("every run logged every column")
    return lines


def render_terminal(table: Table) -> str:
    """Fixed-width table of the terminal columns (per-task scores are in the files), then the footer."""
    cols = [c for c in table.columns if c.terminal]
    header = _headers(table, cols)
    body = [[fmt(row.get(c.key), c.kind) for c in cols] for row in table.rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines + [""] + footer(table)) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(table: Table) -> str:
    header = _headers(table, table.columns)
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        lines.append("| " + " | ".join(_md_cell(fmt(row.get(c.key), c.kind)) for c in table.columns) + " |")
    return "\n".join(lines + [""] + [f"- {line}" for line in footer(table)]) + "\n"


def render_csv(table: Table) -> str:
    """Raw numbers (full precision, full run ids); blank cells stay empty; matched_tokens repeated per row, and
    the context length of each long-context column (`long_context_length_<lang>`) when there is one."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    langs = list(table.long_context_lengths)
    writer.writerow([c.key for c in table.columns] + ["matched_tokens"] + [f"long_context_length_{x}" for x in langs])
    extra = ["" if table.matched_tokens is None else repr(table.matched_tokens)]
    extra += ["" if table.long_context_lengths[x] is None else str(table.long_context_lengths[x]) for x in langs]
    for row in table.rows:
        cells = ["" if row.get(c.key) is None else repr(row[c.key]) if isinstance(row[c.key], float)
                 else str(row[c.key]) for c in table.columns]  # fmt: skip
        writer.writerow(cells + extra)
    return buf.getvalue()


def read_csv(text: str) -> list[dict[str, str]]:
    """The rows of a table.csv (for tests and scripts)."""
    return list(csv.DictReader(io.StringIO(text)))


def render_html(table: Table, plots: dict[str, Path], selection: Selection, title: str) -> str:
    """One self-contained page: the table, its notes and the plots (embedded, so the MLflow UI shows them)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _headers(table, table.columns))
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(row.get(c.key), c.kind))}</td>" for c in table.columns) + "</tr>"
        for row in table.rows
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in footer(table) + selection.notes)
    stores = ", ".join(html.escape(str(s)) for s in selection.stores[:10])
    if len(selection.stores) > 10:
        stores += f", ... ({len(selection.stores)} stores)"
    imgs = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>plots/{html.escape(path.name)}</figcaption>'
        "</figure>"
        for name, path in plots.items()
    )
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}")  # fmt: skip
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(table.rows)} run(s) from {stores}; generated {time.strftime('%Y-%m-%d %H:%M:%S')} by "
        f"<code>python -m fm_pretrain.compare</code>.</p><table><tr>{head}</tr>{rows}</table><ul>{notes}</ul>"
        f"{imgs}</body></html>\n"
    )


def summary(table: Table, selection: Selection, plots: dict[str, Path], args: dict[str, Any]) -> dict[str, Any]:
    """Machine-readable: the selection, the matched token count, blanks per column, the rows, the plot files."""
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": args,
        "stores": [str(s) for s in selection.stores],
        "runs": [
            {"run_id": r.run_id, "name": r.name, "experiment": r.experiment, "store": str(r.store)}
            for r in selection.runs
        ],
        "matched_tokens": table.matched_tokens,
        "long_context_lengths": table.long_context_lengths,
        "missing": table.missing,
        "notes": table.notes + selection.notes,
        "rows": table.rows,
        "plots": sorted(f"plots/{p.name}" for p in plots.values()),
    }


def write_report(
    table: Table, plots: dict[str, Path], selection: Selection, out_dir: Path, title: str, args: dict[str, Any]
) -> dict[str, Path]:
    """Write table.{md,csv,txt}, report.html and summary.json into out_dir (the plots are there already)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "md": f"# {title}\n\n" + render_markdown(table),
        "csv": render_csv(table),
        "txt": render_terminal(table),
        "html": render_html(table, plots, selection, title),
        "json": json.dumps(summary(table, selection, plots, args), indent=1, default=str) + "\n",
    }
    written = {}
    for kind, text in texts.items():
        path = out_dir / FILES[kind]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written[kind] = path
    return written


def log_comparison(
    out_dir: Path,
    table: Table,
    runs: Sequence[RunRecord],
    store: Store,
    experiment: str | None,
    run_name: str,
    description: str,
) -> tuple[str, str]:
    """Create the comparison run (tag kind=comparison) in `experiment` of `store` (default: the first run's) and
    upload out_dir as its artifacts; returns (run id, experiment id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    from fm_pretrain.tracking import ensure_store

    if experiment is None:
        first = next((r for r in runs if r.store == store), runs[0])
        exp_id = first.experiment_id
    else:
        exp_id = ensure_store(store.uri, experiment)
    client = MlflowClient(tracking_uri=store.uri)
    ids = ",".join(r.run_id for r in runs)
    tags = {
        names.T_KIND: names.KIND_COMPARISON,
        "compared_runs": clip(ids, sep=",", note=",..."),
        "mlflow.note.content": clip(description),
    }
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        matched = "" if table.matched_tokens is None else f"{table.matched_tokens:.0f}"
        blanks = str(sum(map(len, table.missing.values())))
        params = [Param("n_runs", str(len(runs))), Param("matched_tokens", matched)]
        client.log_batch(run_id, params=params, tags=[RunTag("n_blank_cells", blanks)])
        client.log_artifacts(run_id, str(out_dir))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id, exp_id
