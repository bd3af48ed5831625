"""The comparison table against hand-made runs whose every value is known (tests/compare/handmade.py).

Real MLflow sqlite store, the real CLI path (`run_compare`), no mocks.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from fm_pretrain.compare.cli import CompareOptions, main, run_compare
from fm_pretrain.compare.plots import PLOT_FILES, ema, thin
from fm_pretrain.compare.report import MAX_TAG_LEN, clip, read_csv
from fm_pretrain.compare.table import NA, Curve, interpolate_at
from tests.compare.handmade import EXPECTED, MATCHED_TOKENS


def compare(db, out, **kw):
    opts = CompareOptions(stores=[str(db)], out=str(out), progress=False, **{"mlflow": False, **kw})
    return run_compare(opts)


def test_table_numbers_equal_the_hand_made_values(handmade_db, tmp_path):
    db, ids = handmade_db
    result = compare(db, tmp_path / "report")
    table = result.table
    assert table.matched_tokens == MATCHED_TOKENS
    rows = {row["run"]: row for row in table.rows}
    assert set(rows) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert rows[name]["run_id"] == ids[name]
        for key, value in expected.items():
            got = rows[name][key]
            if isinstance(value, float):
                assert got == pytest.approx(value, rel=1e-12), (name, key)
            else:
                assert got == value, (name, key, got)
    # sorted by the matched-token loss: fm-a 5.0 < attn-b 5.5 < mamba-c 6.78
    assert [r["run"] for r in table.rows] == ["fm-a", "attn-b", "mamba-c"]
    # per-task columns: each task's primary metric (acc_norm for arc_easy, not its acc of 0.4), old names too
    assert rows["fm-a"]["task:arc_easy"] == 0.5 and rows["attn-b"]["task:arc_easy"] == 0.3
    assert rows["attn-b"]["task:boolq"] == 0.7 and rows["fm-a"]["task:boolq"] is None
    assert table.tasks == {"en": ["arc_easy"], "ja": ["jnli"]}  # boolq is not in every scored run


def test_blanks_are_counted_per_column_and_never_crash(handmade_db, tmp_path):
    db, _ = handmade_db
    table = compare(db, tmp_path / "report").table
    assert table.missing["n_params"] == ["mamba-c"]
    assert table.missing["mfu"] == ["attn-b", "mamba-c"]
    assert table.missing["tokens_per_s"] == ["mamba-c"]
    assert table.missing["downstream_en"] == ["mamba-c"]
    assert table.missing["task:boolq"] == ["fm-a", "mamba-c"]
    assert "m" not in table.missing  # n/a (no FM layer) is not a blank
    rows = {row["run"]: row for row in table.rows}
    assert rows["mamba-c"]["m"] == NA and rows["fm-a"]["k"] == "4"
    total = sum(len(v) for v in table.missing.values())
    txt = (tmp_path / "report" / "table.txt").read_text()
    assert f"blank = not logged by the run: {total} cell(s)" in txt


def test_report_files_and_plots_are_written_and_readable(handmade_db, tmp_path):
    db, ids = handmade_db
    out = tmp_path / "report"
    result = compare(db, out)
    for name in ("table.md", "table.csv", "table.txt", "report.html", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert set(result.plots) == set(PLOT_FILES)  # every plot has data in the hand-made runs
    for path in result.plots.values():
        img = imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, path
    csv_rows = {r["run"]: r for r in read_csv((out / "table.csv").read_text())}
    assert csv_rows["fm-a"]["run_id"] == ids["fm-a"]
    assert float(csv_rows["mamba-c"]["val_loss_matched"]) == pytest.approx(11.0 - 4.5 * 7500 / 8000)
    assert csv_rows["mamba-c"]["n_params"] == "" and float(csv_rows["fm-a"]["matched_tokens"]) == MATCHED_TOKENS
    md = (out / "table.md").read_text()
    assert "| fm-a |" in md and "val loss @ 7.5K tok" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOT_FILES) and "<table>" in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["matched_tokens"] == MATCHED_TOKENS and len(summary["runs"]) == 3


def test_comparison_run_is_logged_tagged_and_left_out_of_the_next_comparison(tmp_path):
    from tests.compare.handmade import log_handmade

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    ids = log_handmade(f"sqlite:///{db}")
    result = compare(db, tmp_path / "first", mlflow=True)
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(result.run_id)
    assert run.data.tags["kind"] == "comparison"
    assert run.info.experiment_id == client.get_run(ids["fm-a"]).info.experiment_id
    assert set(run.data.tags["compared_runs"].split(",")) == set(ids.values())
    assert "| fm-a |" in run.data.tags["mlflow.note.content"]
    listed = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"table.md", "table.csv", "report.html", "plots"} <= listed
    csv_path = client.download_artifacts(result.run_id, "table.csv", str(tmp_path / "dl"))
    assert {r["run"] for r in read_csv(Path(csv_path).read_text())} == set(ids)
    again = compare(db, tmp_path / "second")
    assert {r["run"] for r in again.table.rows} == set(ids)  # the comparison run itself is not compared


def test_cli_prints_the_table_and_the_report_folder(handmade_db, tmp_path, capsys):
    db, _ = handmade_db
    assert main(["--store", str(db), "--out", str(tmp_path / "r"), "--no-mlflow", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fm-a" in out and "val loss @ 7.5K tok" in out and f"report: {tmp_path / 'r'}" in out


def test_interpolation_and_matched_tokens_by_hand():
    curve = Curve(np.array([0.0, 100.0, 300.0]), np.array([10.0, 6.0, 2.0]))
    assert interpolate_at(curve, 200.0) == pytest.approx(4.0)
    assert interpolate_at(curve, 300.0) == pytest.approx(2.0)
    assert interpolate_at(curve, 301.0) is None and interpolate_at(None, 1.0) is None


def test_smoothing_and_thinning():
    y = np.array([1.0, 3.0])
    assert ema(y, 0.0).tolist() == [1.0, 3.0]
    assert ema(y, 0.5)[1] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / (0.5 * 0.5 + 0.5))  # debiased
    x = np.arange(10_000, dtype=float)
    tx, ty = thin(x, x, mean=True)
    assert len(tx) == 2000 and ty.mean() == pytest.approx(x.mean())
    sx, _ = thin(x, x, mean=False)
    assert sx[0] == 0 and sx[-1] == 9999 and len(sx) <= 2001
    assert math.isclose(thin(x[:5], x[:5], True)[0].sum(), 10)


def test_long_tag_values_are_cut_at_a_boundary_within_mlflows_limit():
    text = "\n".join(f"| run-{i} | 1.0 |" for i in range(2000))
    cut = clip(text)
    assert len(cut) <= MAX_TAG_LEN and cut.endswith("(cut; the full table is in table.md)")
    assert cut.split("\n")[-2].endswith("|")  # whole lines only
    ids = ",".join("f" * 32 for _ in range(400))
    cut = clip(ids, sep=",", note=",...")
    assert len(cut) <= MAX_TAG_LEN and all(len(x) == 32 for x in cut.split(",")[:-1])
    assert clip("short") == "short"
