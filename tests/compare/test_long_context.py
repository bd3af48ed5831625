"""Long-context and retrieval metrics in the comparison: table columns, plots, both read paths (handmade.py).

Real MLflow sqlite store, the real CLI path (`run_compare`), no mocks.
"""

import json

import numpy as np
import pytest
from matplotlib.image import imread

from fm_pretrain.compare import names
from fm_pretrain.compare.cli import CompareOptions, run_compare
from fm_pretrain.compare.history import long_context_keys, read_client, read_sqlite, retrieval_keys
from fm_pretrain.compare.plots import PLOT_FILES
from fm_pretrain.compare.report import read_csv, render_csv
from fm_pretrain.compare.select import resolve_stores, select_runs
from fm_pretrain.compare.table import build_table, common_length, context_length, derive_curves, labels_for
from tests.compare.handmade import EXPECTED, LONG_CONTEXT, LONG_CONTEXT_LENGTHS, RETRIEVAL

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def compare(db, out, **kw):
    return run_compare(CompareOptions(stores=[str(db)], out=str(out), progress=False, mlflow=False, **kw))


def _points(curve) -> dict[int, float]:
    return dict(zip(curve.x.astype(int).tolist(), curve.y.tolist(), strict=True))


def test_long_context_columns_hold_the_loss_at_the_longest_common_length(handmade_db, tmp_path):
    result = compare(handmade_db[0], tmp_path / "report")
    table = result.table
    assert table.long_context_lengths == LONG_CONTEXT_LENGTHS
    rows = {row["run"]: row for row in table.rows}
    for name, expected in EXPECTED.items():
        for lang in ("en", "ja"):
            assert rows[name][f"long_context_{lang}"] == expected[f"long_context_{lang}"], (name, lang)
    # blanks counted as for every other column; the run without any long-context metric is blank in both
    assert table.missing["long_context_en"] == ["mamba-c"]
    assert table.missing["long_context_ja"] == ["attn-b", "mamba-c"]
    keys = [c.key for c in table.columns]
    assert keys.index("downstream_ja") < keys.index("long_context_en") < keys.index("long_context_ja")

    out = tmp_path / "report"
    md = (out / "table.md").read_text()
    assert "EN loss-so-far @ 2K ctx" in md and "JA loss-so-far @ 2K ctx" in md
    assert "mean NLL over the first 2048 tokens (long_context/en/loss_so_far/2048)" in md
    assert "EN loss-so-far @ 2K ctx" in (out / "table.txt").read_text()
    csv_rows = {r["run"]: r for r in read_csv((out / "table.csv").read_text())}
    assert float(csv_rows["fm-a"]["long_context_en"]) == 2.8 and float(csv_rows["attn-b"]["long_context_en"]) == 3.9
    assert csv_rows["mamba-c"]["long_context_en"] == "" and csv_rows["attn-b"]["long_context_ja"] == ""
    assert csv_rows["fm-a"]["long_context_length_en"] == "2048" == csv_rows["mamba-c"]["long_context_length_ja"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["long_context_lengths"] == LONG_CONTEXT_LENGTHS
    assert summary["missing"]["long_context_ja"] == ["attn-b", "mamba-c"]


def test_curves_are_the_latest_evaluation_only(handmade_db, tmp_path):
    """fm-a's step-5 evaluation reached 8192 and had other values: none of it enters its step-10 curve."""
    db, _ = handmade_db
    store = resolve_stores([str(db)])[0]
    runs = select_runs([store]).runs
    hist = read_sqlite(store, runs)
    for run, label in zip(runs, labels_for(runs), strict=True):
        c = derive_curves(run, hist[run.run_id], label)
        assert {lang: (c.long_context_step[lang], _points(curve)) for lang, curve in c.long_context.items()} == (
            LONG_CONTEXT[label]
        )
        assert {task: (c.retrieval_step[task], _points(curve)) for task, curve in c.retrieval.items()} == (
            RETRIEVAL[label]
        )


def test_plots_exist_and_are_valid_pngs(handmade_db, tmp_path):
    result = compare(handmade_db[0], tmp_path / "report")
    for name in ("long_context", "retrieval"):
        path = result.plots[name]
        assert path == tmp_path / "report" / "plots" / PLOT_FILES[name]
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        img = imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, path
    html = (tmp_path / "report" / "report.html").read_text()
    assert "plots/long_context.png" in html and "plots/retrieval.png" in html


def test_runs_without_long_context_metrics_get_no_columns_and_no_plots(handmade_db, tmp_path):
    db, ids = handmade_db
    result = compare(db, tmp_path / "report", run_ids=[ids["mamba-c"]])
    assert result.table.long_context_lengths == {}
    assert not any(c.key.startswith("long_context") for c in result.table.columns)
    assert not any(k.startswith("long_context") for k in result.table.missing)
    assert "long_context" not in result.plots and "retrieval" not in result.plots
    assert not (tmp_path / "report" / "plots" / PLOT_FILES["long_context"]).exists()
    assert "long_context_length" not in (tmp_path / "report" / "table.csv").read_text()


def test_sqlite_and_client_paths_give_equal_long_context_tables(handmade_db):
    db, _ = handmade_db
    store = resolve_stores([str(db)])[0]
    runs = select_runs([store]).runs
    fast, slow = read_sqlite(store, runs), read_client(store, runs)
    n_keys = 0
    for r in runs:
        lc = sorted(k for k in fast[r.run_id] if k.startswith(("long_context/", "retrieval/")))
        assert lc == sorted(k for k in slow[r.run_id] if k.startswith(("long_context/", "retrieval/")))
        for key in lc:
            np.testing.assert_array_equal(fast[r.run_id][key].values, slow[r.run_id][key].values)
            np.testing.assert_array_equal(fast[r.run_id][key].steps, slow[r.run_id][key].steps)
        n_keys += len(lc)
    assert n_keys == 6 + 2 + 3 + 2  # fm-a: 6 loss-so-far (4 EN, 2 JA) + 2 retrieval; attn-b: 3 + 2; no NLL buckets
    tables = [
        build_table([derive_curves(r, h[r.run_id], label) for r, label in zip(runs, labels_for(runs), strict=True)])
        for h in (fast, slow)
    ]
    assert render_csv(tables[0]) == render_csv(tables[1])
    assert tables[0].long_context_lengths == LONG_CONTEXT_LENGTHS


def test_key_parsing_matches_what_the_evaluations_log():
    """The names the comparison parses are those fm_pretrain.eval.long_context / retrieval log."""
    from fm_pretrain.eval import long_context, retrieval

    assert names.LONG_CONTEXT_PREFIX == long_context.METRIC_PREFIX
    assert names.LONG_CONTEXT_LANGS == long_context.LANGS
    assert names.RETRIEVAL_PREFIX == retrieval.METRIC_PREFIX
    lc = {"languages": {"en": {"loss_so_far": {"1024": 3.0, "3000": 2.9},
                               "buckets": [{"lo": 0, "hi": 128, "nll": 4.0}]}}}  # fmt: skip
    assert long_context_keys(list(long_context.flat_metrics(lc))) == {
        "long_context/en/loss_so_far/1024": ("en", 1024),
        "long_context/en/loss_so_far/3000": ("en", 3000),
    }
    grid = retrieval.accuracy_grid(
        [retrieval.RetrievalTrial("passkey", L, d, "1", [], 0, 0) for L in (1024, 4096) for d in (0.0, 0.5)],
        [True, False, True, True],
    )
    flat = retrieval.flat_metrics({"tasks": {"passkey": grid}})
    assert len(flat) == 7  # overall, two per length, four per (length, depth): only the per-length two are read
    assert retrieval_keys(list(flat)) == {"retrieval/passkey/acc/1024": ("passkey", 1024),
                                          "retrieval/passkey/acc/4096": ("passkey", 4096)}  # fmt: skip
    assert flat["retrieval/passkey/acc/1024"] == 0.5


@pytest.mark.parametrize(("n", "text"), [(1024, "1K"), (131072, "128K"), (3000, "3000"), (512, "512")])
def test_context_length_labels(n, text):
    assert context_length(n) == text


def test_common_length_is_the_longest_length_every_curve_logged():
    from fm_pretrain.compare.table import Curve

    a = Curve(np.array([1024.0, 2048.0, 4096.0]), np.zeros(3))
    b = Curve(np.array([1024.0, 2048.0, 3000.0]), np.zeros(3))
    assert common_length([a, b]) == 2048 and common_length([a]) == 4096
    assert common_length([Curve(np.array([500.0]), np.zeros(1)), a]) is None and common_length([]) is None
