"""scripts/gpu_check.sh and scripts/gpu_wheels.sh (docs/gpu_check.md): the CPU dry run of every stage, the
stage runner's failure handling, and whether the GPU image plus the carried wheels provide every import."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

GPU_CHECK = REPO / "scripts" / "gpu_check"
WHEEL_DIR = REPO / ".whl"


def load(name: str):
    """A module of scripts/gpu_check/ (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", GPU_CHECK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


check = load("check")
wheel_imports = load("wheel_imports")


# ---- the imports the check makes, against the image and wheels.txt (static: no network, no .whl/) ----


def test_every_import_the_check_runs_is_on_the_image_or_in_wheels_txt() -> None:
    found = wheel_imports.walk()
    # the walk reaches the trainer, the kernels, the benchmarks and the gpu-marked tests
    assert {"torch", "deepspeed", "megatron", "sentencepiece", "yaml", "triton", "pytest"} <= {f.module for f in found}
    assert any(f.module == "fla" and f.how == "optional" for f in found)  # bench/kernels.py's reference kernels
    covered = set(wheel_imports.read_list(wheel_imports.IMAGE_TXT)) | {r["name"] for r in wheel_imports.wheel_plan()}
    problems, excused = wheel_imports.coverage(found, covered)
    assert problems == []
    # what is not carried is never imported when a module loads: only lazily or under try/except ImportError
    for f in found:
        if f.module in wheel_imports.NOT_NEEDED:
            assert f.how != "module", f"{f.module} at {f.where} runs at import time: carry it instead"
    assert any(e.startswith("mlflow") for e in excused)  # tracking is off in the check: MLflow is not carried


def test_walk_classifies_import_sites(tmp_path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import numpy\n"
        "from yaml import safe_load\n"
        "try:\n    import fla.ops\nexcept ImportError:\n    fla = None\n"
        "def f():\n    import mlflow\n    try:\n        import zstandard\n    except Exception:\n        pass\n"
    )
    got = {(mod.split(".")[0], how) for mod, _, how, _ in wheel_imports.imports_of(src)}
    assert got == {
        ("numpy", "module"),
        ("yaml", "module"),
        ("fla", "optional"),
        ("mlflow", "lazy"),
        ("zstandard", "optional"),
    }


def test_wheel_set_is_complete_and_small_enough() -> None:
    """The wheels scripts/gpu_wheels.sh downloaded: exactly wheels.txt, under the carry limit, and every
    Requires-Dist (for CPython 3.12 / x86-64 Linux) carried or on the image."""
    if not any(WHEEL_DIR.glob("*.whl")):
        pytest.skip(f"no wheels in {WHEEL_DIR}: run `bash scripts/gpu_wheels.sh` (needs PyPI) to check the set")
    report = wheel_imports.check_wheels(WHEEL_DIR)
    assert report["problems"] == []
    assert report["total_bytes"] < 60 * 2**20
    carried = {w["name"] for w in report["wheels"]}
    covered = set(wheel_imports.read_list(wheel_imports.IMAGE_TXT)) | carried
    needed = {wheel_imports.distribution_of(f.module) for f in wheel_imports.walk() if f.how != "optional"}
    needed -= {wheel_imports.distribution_of(m) for m in wheel_imports.NOT_NEEDED}
    assert needed <= covered, needed - covered
    assert "fla-core" in carried  # bench/kernels.py compares with chunk_gla on the GPU


# ---- the stage runner ----


def test_stage_timeout_stops_the_whole_process_group(tmp_path) -> None:
    log = tmp_path / "stage.log"
    marker = tmp_path / "child_survived"
    script = f"(sleep 4; touch {marker}) & sleep 60"  # a grandchild, as torchrun's ranks are
    t0 = time.monotonic()
    rc, timed_out, seconds = check.run_process(["bash", "-c", script], log, timeout=1, env=dict(os.environ))
    assert timed_out and rc is not None and rc != 0 and time.monotonic() - t0 < 15
    time.sleep(5)
    assert not marker.exists()
    assert "stopped at the stage's time limit" in log.read_text()
    rc, timed_out, _ = check.run_process(["bash", "-c", "echo boom; exit 3"], log, timeout=10, env=dict(os.environ))
    assert (rc, timed_out) == (3, False) and check.tail(log)[-1] == "boom"


def test_training_result_reads_metrics_jsonl(tmp_path) -> None:
    rows = [
        {"step": 0, "val/loss": 10.0},
        {"step": 5, "train/loss": 9.0, "perf/tokens_per_s": 10.0, "perf/mfu": 0.01, "perf/step_time_s": 9.0},
        {"step": 10, "train/loss": 8.0, "perf/tokens_per_s": 300.0, "perf/mfu": 0.3, "perf/step_time_s": 1.0},
        {"step": 15, "train/loss": 7.0, "perf/tokens_per_s": 100.0, "perf/mfu": 0.1, "perf/step_time_s": 3.0},
        {"step": 20, "train/loss": 6.0, "perf/tokens_per_s": 200.0, "perf/mfu": 0.2, "perf/step_time_s": 2.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "train.log"
    log.write_text("[12:00:00 rank0] model fm: 116.60M parameters, 12 layers ['fm']; 1 ranks on NVIDIA H200\n")
    got = check.training_result(tmp_path, log, sampled_peak_mib=2048.0)
    assert got["tokens_per_s"] == 200.0 and got["mfu"] == 0.2  # medians without the first (warm-up) window
    assert got["first_window_tokens_per_s"] == 10.0 and got["final_train_loss"] == 6.0
    assert got["params_m"] == 116.6 and got["peak_mem_gib"] == 2.0 and "nvidia-smi" in got["peak_mem_source"]
    with (tmp_path / "metrics.jsonl").open("a") as f:  # once the trainer logs its own peak, that one is used
        f.write(json.dumps({"step": 25, "perf/tokens_per_s": 1.0, "perf/peak_mem_gib": 3.5}) + "\n")
    got = check.training_result(tmp_path, log, sampled_peak_mib=2048.0)
    assert got["peak_mem_gib"] == 3.5 and "trainer" in got["peak_mem_source"]


def test_out_of_budget_stages_are_skipped_and_summarised(tmp_path) -> None:
    out = tmp_path / "out"
    rc = check.main([str(out), "--cpu-dry-run", "--budget", "1", "--work", str(tmp_path / "work")])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0 and summary["counts"] == {"skipped": len(summary["stages"])}
    assert all("budget" in s["reason"] for s in summary["stages"] if s["name"].startswith("train_"))
    assert "| train_fm_125m | skipped" in (out / "summary.md").read_text()


def test_training_overrides_are_the_ones_documented() -> None:
    run = check.GPU_RUNS[0]
    overrides = check.train_overrides(run, Path("/d"), Path("/r"), dry=False)
    keys = dict(o.split("=", 1) for o in overrides)
    val_every, val_batches = check.validation_keys()
    assert keys["train.ds_config"] == "ds_configs/zero2.json" and keys["train.precision"] == "bf16"
    assert keys["tracking.enabled"] == "false" and keys["data.seq_len"] == keys["model.max_seq_len"] == "2048"
    assert keys[val_every] == str(run.steps) and keys[val_batches] == "1"
    assert [r.name for r in check.GPU_RUNS] == ["fm_125m", "transformer_125m", "mamba2_125m", "fm_1b"]


# ---- the whole dry run (what CI runs) ----


@pytest.mark.slow
def test_cpu_dry_run(tmp_path) -> None:
    """Every stage at toy sizes on CPU: the wheel-free import check, data, configs (also at the GPU's sizes),
    gpu test collection, the benchmarks with a dry-run mode, the four training runs; then the summary."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--cpu-dry-run", "--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert set(stages) == set(check.LIMITS)
    bad = {n: s.get("log_tail", [])[-8:] for n, s in stages.items() if s["status"] not in ("ok", "skipped")}
    assert not bad, bad
    assert stages["gpu_tests"]["status"] == "skipped" and "no GPU" in stages["gpu_tests"]["reason"]
    assert stages["gpu_tests"]["results"]["collected"] > 0
    for name in ("train_fm_125m", "train_transformer_125m", "train_mamba2_125m", "train_fm_1b"):
        res = stages[name]["results"]
        assert stages[name]["status"] == "ok" and res["logged_steps"] == [1, 2] and res["tokens_per_s"] > 0, name
    for name in ("bench_kernels", "bench_kernels_scalar"):
        assert stages[name]["status"] == "ok" and stages[name]["results"]["rows"], name
    assert stages["data"]["results"]["vocab_size"] == 32000
    assert all(v.startswith("ok") for v in stages["configs"]["results"].values()), stages["configs"]["results"]
    assert stages["install"]["results"]["failed"] == {}
    imports = summary["imports"]
    assert imports["processes"] >= 10 and imports["problems"] == [] and imports["not_needed_but_imported"] == []
    assert "## Training" in (out / "summary.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/train_fm_125m.log" in names and "runs/train_fm_125m.metrics.jsonl" in names
