"""The GPU check: every GPU measurement of issue 14 in one command, each stage under its own time limit.

    bash scripts/gpu_check.sh OUT_DIR                    # on the GPU machine (docs/gpu_check.md)
    bash scripts/gpu_check.sh OUT_DIR --cpu-dry-run      # the same stages at tiny sizes on CPU (CI)
    bash scripts/gpu_check.sh OUT_DIR --only train_fm_125m,bench_kernels   # rerun some stages

Stages run in order; each is a subprocess with a time limit (`LIMITS`), and all of them share one budget
(`--budget`, 450 s by default: the whole check ends in under 8 minutes). A stage that fails or runs out of
time is recorded (exit code, the tail of its log) and the next one starts. OUT_DIR receives summary.json,
summary.md and logs.tar.gz (every stage's log, metrics.jsonl of the training runs, the benchmarks' rows, the
import records); summary.md is also printed last.

This file uses the standard library only: it runs before the carried wheels are installed, and everything
else runs in subprocesses (stage_tasks.py, wheel_imports.py, the trainer, pytest, bench/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PY = sys.executable

DEFAULT_BUDGET_S = {"gpu": 450.0, "cpu": 420.0}
SUMMARY_RESERVE_S = 8.0  # kept back from the budget for the import classification and the summary
MIN_STAGE_S = 10.0  # a stage is not started with less time than this left

# Seconds per stage, (GPU, CPU dry run). On the GPU the first stages warm Triton's and Inductor's caches for
# the later ones; the order puts correctness first, then the figures the goals name.
LIMITS = {
    "env": (30, 60),
    "install": (60, 60),
    "data": (45, 60),
    "configs": (30, 30),
    "gpu_tests": (120, 60),
    "bench_kernels": (60, 60),
    "bench_sparse_train": (45, 60),
    "train_fm_125m": (100, 60),
    "train_transformer_125m": (100, 60),
    "train_mamba2_125m": (90, 60),
    "train_fm_1b": (110, 60),
    "bench_kernels_scalar": (30, 60),
    "bench_sparse_decode": (30, 60),
    "bench_decode": (45, 120),  # CPU dry run: four model processes start, one after another
}


# ---------------------------------------------------------------------------------------------------------
# Training runs. The overrides are all here (one place); see docs/gpu_check.md.


@dataclass
class TrainRun:
    name: str
    config: str
    steps: int
    log_every: int
    micro_batch: int
    grad_accum: int = 1
    seq_len: int = 2048  # the goal compares fm_125m and transformer_125m at 2K context


GPU_RUNS = [
    # 125M at 2K context: 8 x 2048 tokens per micro-batch (the configs' 16 x 1024), 30 steps, 6 log windows.
    TrainRun("fm_125m", "configs/fm_125m.yaml", steps=30, log_every=5, micro_batch=8),
    TrainRun("transformer_125m", "configs/transformer_125m.yaml", steps=30, log_every=5, micro_batch=8),
    TrainRun("mamba2_125m", "configs/mamba2_125m.yaml", steps=30, log_every=5, micro_batch=8),
    # ~1B (fm_1b, 1.0B parameters) on one GPU: 4 x 2048 tokens per step, 8 steps, 4 log windows.
    TrainRun("fm_1b", "configs/fm_1b.yaml", steps=8, log_every=2, micro_batch=4),
]
DRY_SIZES = dict(steps=2, log_every=1, micro_batch=2, seq_len=128)
TINY_MODEL = [  # the dry run's model: every mixer at toy width, whatever the config
    "model.d_model=64",
    "model.n_layers=2",
    "model.fm.n_heads=2",
    "model.fm.n_memories=8",
    "model.fm.d_mem=16",
    "model.fm.top_k=2",
    "model.fm.chunk_size=16",
    "model.attention.n_heads=2",
    "model.mamba2.d_state=16",
    "model.mamba2.head_dim=16",
    "model.mamba2.chunk_size=16",
]
# The trainer's validation keys: train.eval_every / eval_batches were renamed val_every / val_batches. The first
# pair that this checkout's TrainConfig has is used; extend the list if they are renamed again.
VALIDATION_KEYS = [("val_every", "val_batches"), ("eval_every", "eval_batches")]


def validation_keys() -> tuple[str, str]:
    import dataclasses

    sys.path.insert(0, str(REPO))
    try:
        from fm_pretrain.config import TrainConfig  # imports only PyYAML, which the image has

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
    except Exception:  # a broken config module fails the configs stage, with its message
        fields = set()
    finally:
        sys.path.pop(0)
    for every, batches in VALIDATION_KEYS:
        if every in fields and batches in fields:
            return f"train.{every}", f"train.{batches}"
    return f"train.{VALIDATION_KEYS[0][0]}", f"train.{VALIDATION_KEYS[0][1]}"


def train_overrides(run: TrainRun, data_dir: Path, run_dir: Path, dry: bool) -> list[str]:
    """Every override of a training stage: bundled data at 2K context, one GPU, ZeRO-2, bf16, tracking off."""
    steps, log_every, micro, seq = run.steps, run.log_every, run.micro_batch, run.seq_len
    if dry:
        steps, log_every, micro, seq = (DRY_SIZES[k] for k in ("steps", "log_every", "micro_batch", "seq_len"))
    val_every, val_batches = validation_keys()
    overrides = [
        f"data.path={data_dir / 'packed'}",
        f"data.tokenizer={data_dir / 'tokenizer.model'}",
        f"data.seq_len={seq}",
        f"model.max_seq_len={seq}",
        f"train.run_dir={run_dir}",
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        f"{val_every}={steps}",  # validation loss before the first step and after the last only
        f"{val_batches}=1",
        f"train.save_every={steps}",  # the trainer saves after the last step whatever this says
        f"train.micro_batch_size={micro}",
        f"train.grad_accum={run.grad_accum}",
        "train.precision=bf16",
        "train.ds_config=ds_configs/zero2.json",
        "train.resume=false",
        "train.save_on_signal=false",  # a stage stopped at its time limit exits without saving
        "tracking.enabled=false",
    ]
    return overrides + (TINY_MODEL if dry else [])


def train_command(run: TrainRun, overrides: list[str]) -> list[str]:
    """One rank under torchrun, as fm_pretrain.launch.train_command builds it."""
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "fm_pretrain/train.py"] + [
        "--config",
        run.config,
        *overrides,
    ]


# ---------------------------------------------------------------------------------------------------------
# Running stages


@dataclass
class Stage:
    name: str
    what: str
    cmd: list[str] | None = None
    kind: str = "plain"  # plain | train | bench | tests | install | data | configs | env
    skip: str | None = None  # reason, when the stage is not run
    extra_env: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    run: TrainRun | None = None
    run_dir: Path | None = None
    result: dict = field(default_factory=dict)


class GpuMemorySampler(threading.Thread):
    """Peak `nvidia-smi` memory.used (MiB) while a stage runs: allocator reserve and CUDA context included."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = 0.0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak_mib = max([self.peak_mib, *(float(x) for x in out.split())])
                self.samples += 1
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop_event.wait(0.5)

    def stop(self) -> float | None:
        self._stop_event.set()
        self.join(timeout=10)
        return self.peak_mib if self.samples else None


def run_process(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, bool, float]:
    """Run cmd in its own process group with output to `log`; on timeout SIGTERM the group, then SIGKILL."""
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n")
            return 127, False, time.monotonic() - t0
        try:
            rc = p.wait(timeout=timeout)
            return rc, False, time.monotonic() - t0
        except subprocess.TimeoutExpired:
            pass
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        f.write(f"\n[gpu_check] stopped at the stage's time limit ({timeout:.0f} s)\n")
    return p.returncode, True, time.monotonic() - t0


def tail(path: Path, lines: int = 30, width: int = 300) -> list[str]:
    if not path.is_file():
        return []
    text = path.read_text(errors="replace").splitlines()
    return [line[:width] for line in text[-lines:]]


def last_json(path: Path) -> dict | None:
    """The last line of a log that parses as a JSON object."""
    for line in reversed(tail(path, 200, 10**6)):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def json_lines(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Reading results


def training_result(run_dir: Path, log: Path, sampled_peak_mib: float | None) -> dict:
    """tokens/s and MFU (median over the log windows after the first, which holds compilation and warm-up),
    peak memory, last loss, parameters, from run_dir/metrics.jsonl and the log."""
    rows = [r for r in json_lines(run_dir / "metrics.jsonl") if "perf/tokens_per_s" in r]
    out: dict = {"logged_steps": [r["step"] for r in rows]}
    steady = rows[1:] if len(rows) > 1 else rows
    if steady:
        out["tokens_per_s"] = statistics.median(r["perf/tokens_per_s"] for r in steady)
        out["step_time_s"] = statistics.median(r.get("perf/step_time_s", float("nan")) for r in steady)
        mfu = [r["perf/mfu"] for r in steady if "perf/mfu" in r]
        out["mfu"] = statistics.median(mfu) if mfu else None
        out["first_window_tokens_per_s"] = rows[0]["perf/tokens_per_s"]
        out["final_train_loss"] = rows[-1].get("train/loss")
    trainer_peak = [r["perf/peak_mem_gib"] for r in rows if "perf/peak_mem_gib" in r]
    if trainer_peak:
        out["peak_mem_gib"], out["peak_mem_source"] = max(trainer_peak), "trainer (torch.cuda.max_memory_allocated)"
    elif sampled_peak_mib is not None:
        out["peak_mem_gib"], out["peak_mem_source"] = sampled_peak_mib / 1024, "nvidia-smi memory.used, sampled"
    for line in tail(log, 400, 2000):
        if "M parameters" in line and "model " in line:
            with contextlib.suppress(ValueError):
                out["params_m"] = float(line.split("M parameters")[0].rsplit(" ", 1)[-1])
    return out


def tests_result(xml_path: Path) -> dict:
    if not xml_path.is_file():
        return {}
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    res = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
    res["not_passed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return res


# ---------------------------------------------------------------------------------------------------------
# The plan


def build_stages(args: argparse.Namespace, work: Path) -> list[Stage]:
    dry = args.cpu_dry_run
    logs, data_dir = work / "logs", work / "data"
    wheel_dir = REPO / ".whl"
    stages: list[Stage] = []
    add = stages.append

    add(Stage("env", "versions, the device, nvidia-smi", [PY, str(HERE / "stage_tasks.py"), "env"], kind="env"))
    if dry:
        cmd = [PY, str(HERE / "wheel_imports.py"), "verify"]
        what = "import everything the check needs (the CPU venv; the wheels are for CPython 3.12 and are not installed)"
    else:
        pip = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        script = (
            f"set -e; shopt -s nullglob; whl=({shlex.quote(str(wheel_dir))}/*.whl); "
            f'if [ ${{#whl[@]}} -eq 0 ]; then echo "no wheels in .whl/ (carry=[\\".whl\\"])"; exit 3; fi; '
            f'{shlex.join(pip)} --upgrade --target {shlex.quote(str(work / "site"))} "${{whl[@]}}"; '
            f"{shlex.join(pip)} --no-build-isolation -e {shlex.quote(str(REPO))} "
            f"|| echo 'editable install failed: the checkout is on PYTHONPATH instead'; "
            f"{shlex.join([PY, str(HERE / 'wheel_imports.py'), 'verify'])}"
        )
        cmd, what = ["bash", "-c", script], "carried wheels (.whl/) -> work/site, this package (-e), import check"
    add(Stage("install", what, cmd, kind="install"))
    data_cmd = [PY, str(HERE / "stage_tasks.py"), "data", "--out", str(data_dir), "--repeat", "10"]
    add(Stage("data", "tokenizer (32K ids) + packed data/tiny x 10", data_cmd, kind="data"))

    runs = []
    for run in GPU_RUNS:
        run_dir = work / "runs" / run.name
        runs.append({"name": run.name, "config": run.config, "overrides": train_overrides(run, data_dir, run_dir, dry)})
        if dry:  # also the GPU's full-size overrides, so a renamed key fails in CI rather than on the GPU
            gpu = train_overrides(run, data_dir, run_dir, False)
            runs.append({"name": f"{run.name} (GPU sizes)", "config": run.config, "overrides": gpu})
    add(Stage("configs", "every training stage's config + overrides loads", kind="configs"))
    stages[-1].cmd = [PY, str(HERE / "stage_tasks.py"), "configs", "--runs", json.dumps(runs)]

    gpu_files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text(encoding="utf-8", errors="replace")
    )
    junit = logs / "gpu_tests.xml"
    pytest = [PY, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "--durations=15", "-p", "no:cacheprovider"]
    pytest.append("--continue-on-collection-errors")
    if dry:
        tests = Stage("gpu_tests", "pytest -m gpu: collection only (no GPU)", [*pytest, "--collect-only", *gpu_files])
        tests.kind = "tests"
    else:
        tests = Stage("gpu_tests", "pytest -m gpu (bf16 at real sizes)", [*pytest, f"--junitxml={junit}", *gpu_files])
        tests.kind, tests.artifacts = "tests", [junit]
    add(tests)

    def bench(name: str, what: str, script: str, gpu_args: list[str], out: Path | None = None) -> Stage:
        path = REPO / script
        stage = Stage(name, what, kind="bench", artifacts=[out] if out else [])
        if not path.is_file():
            stage.skip = f"{script} is not in this checkout"
            return stage
        if dry:
            if "--cpu-dry-run" not in path.read_text():
                stage.skip = f"{script} has no --cpu-dry-run mode"
                return stage
            keep = [a for a in gpu_args if a in ("train", "decode")]  # the sub-command only; sizes are its own
            stage.cmd = [PY, script, *keep, "--cpu-dry-run"]
            stage.extra_env = {"TRITON_INTERPRET": "1"}
        else:
            stage.cmd = [PY, script, *gpu_args]
        if out is not None:
            stage.cmd += ["--out" if "kernels" in script else "--json", str(out)]
        return stage

    add(
        bench(
            "bench_kernels",
            "dense FM fwd+bwd vs fla chunk_gla, T=2K, m in 64/128/256",
            "bench/kernels.py",
            ["--seq-lens", "2048", "--keys", "64", "128", "256"],
            logs / "bench_kernels.jsonl",
        )
    )
    sparse = ["train", "--dtype", "bf16", "--dense-backend", "triton", "--seq-lens", "2048"]
    add(bench("bench_sparse_train", "sparse vs dense FM fwd+bwd, T=2K", "bench/fm_sparse.py", sparse))
    for run in GPU_RUNS:
        run_dir = work / "runs" / run.name
        overrides = train_overrides(run, data_dir, run_dir, dry)
        what = f"{run.config}, {run.steps} steps" if not dry else f"{run.config}, tiny, 2 steps (CPU)"
        stage = Stage(f"train_{run.name}", what, train_command(run, overrides), kind="train", run=run)
        stage.run_dir = run_dir
        add(stage)
    scalar = ["--decay", "scalar", "--keys", "128", "--values", "64", "--seq-lens", "2048"]
    add(
        bench(
            "bench_kernels_scalar",
            "Mamba-2 decay vs fla chunk_simple_gla",
            "bench/kernels.py",
            scalar,
            logs / "bench_kernels_scalar.jsonl",
        )
    )
    add(bench("bench_sparse_decode", "decode step: FM sparse/dense, Mamba-2", "bench/fm_sparse.py", ["decode"]))
    add(bench("bench_decode", "bench/decode.py", "bench/decode.py", []))
    return stages


def select(stages: list[Stage], only: str | None, skip: str | None) -> None:
    names = {s.name for s in stages}
    chosen = set(only.split(",")) if only else set(names)
    dropped = set(skip.split(",")) if skip else set()
    unknown = (chosen | dropped) - names
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in stages]}")
    if any(n.startswith("train_") for n in chosen - dropped):
        chosen |= {"data"}  # training needs the packed data
    chosen |= {"env", "install"}
    for s in stages:
        if s.skip is None and (s.name not in chosen or s.name in dropped):
            s.skip = "not selected (--only/--skip)"


def stage_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(HERE / "trace")]
    if not args.cpu_dry_run:
        path.append(str(work / "site"))  # the carried wheels, ahead of the image's packages
    path += [str(REPO), str(REPO / "kernels")]  # this package, whether or not pip installed it
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        FM_GPU_CHECK_TRACE=str(work / "imports"),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_UPDATE_DOWNLOAD_COUNTS="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        TORCH_NCCL_ASYNC_ERROR_HANDLING="3",
    )
    if args.cpu_dry_run:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run even where a GPU is visible
    return env


def run_stages(stages: list[Stage], args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    logs = work / "logs"
    mode = "cpu" if args.cpu_dry_run else "gpu"
    deadline = time.monotonic() + args.budget - SUMMARY_RESERVE_S
    sample_memory = not args.cpu_dry_run and shutil.which("nvidia-smi") is not None
    for st in stages:
        r = st.result
        r.update(name=st.name, what=st.what)
        if st.skip:
            r.update(status="skipped", reason=st.skip)
            print(f"[gpu_check] {st.name:24s} skipped: {st.skip}", flush=True)
            continue
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            r.update(status="skipped", reason=f"out of budget ({args.budget:.0f} s)")
            print(f"[gpu_check] {st.name:24s} skipped: out of budget", flush=True)
            continue
        limit = min(LIMITS[st.name][0 if mode == "gpu" else 1], left)
        log = logs / f"{st.name}.log"
        print(f"[gpu_check] {st.name:24s} start (limit {limit:.0f} s): {st.what}", flush=True)
        sampler = GpuMemorySampler() if sample_memory and st.kind in ("train", "bench", "tests") else None
        if sampler:
            sampler.start()
        rc, timed_out, seconds = run_process(st.cmd, log, limit, {**env, **st.extra_env})
        peak = sampler.stop() if sampler else None
        status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
        r.update(status=status, rc=rc, seconds=round(seconds, 1), limit_s=round(limit), log=f"logs/{st.name}.log")
        r["results"] = stage_results(st, log, peak, args)
        if st.name == "gpu_tests" and args.cpu_dry_run and status == "ok":
            r.update(status="skipped", reason="no GPU (the gpu-marked tests were collected, not run)")
        if status != "ok":
            r["log_tail"] = tail(log)
        if st.run_dir is not None:  # keep metrics.jsonl, drop the checkpoints (GBs at 1B)
            shutil.rmtree(st.run_dir / "checkpoints", ignore_errors=True)
        print(f"[gpu_check] {st.name:24s} {r['status']} in {seconds:.0f} s (rc {rc})", flush=True)


def stage_results(st: Stage, log: Path, peak_mib: float | None, args: argparse.Namespace) -> dict:
    if st.kind == "train" and st.run_dir is not None:
        return training_result(st.run_dir, log, peak_mib)
    if st.kind == "tests":
        if args.cpu_dry_run:
            collected = [line for line in tail(log, 400) if "::" in line]
            return {"collected": len(collected)}
        return tests_result(st.artifacts[0]) | ({"peak_mem_gib": peak_mib / 1024} if peak_mib else {})
    if st.kind == "bench":
        rows = json_lines(st.artifacts[0]) if st.artifacts else []
        rows = rows or json_lines(log)  # fm_sparse.py prints one JSON row per line as it goes
        return {"rows": rows} | ({"peak_mem_gib": peak_mib / 1024} if peak_mib else {})
    if st.kind in ("env", "install", "data", "configs"):
        return last_json(log) or {}
    return {}


# ---------------------------------------------------------------------------------------------------------
# Summary


def fmt(x, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return "-" if x is None else str(x)


def summary_markdown(summary: dict) -> str:
    env = next((s.get("results", {}) for s in summary["stages"] if s["name"] == "env"), {})
    lines = [
        f"# GPU check ({'CPU dry run' if summary['cpu_dry_run'] else 'GPU'}), {summary['started']}",
        "",
        f"- device: {env.get('device', '?')}{f' ({smi})' if (smi := env.get('nvidia_smi')) else ''}; "
        f"torch {env.get('torch', '?')}, "
        f"triton {env.get('triton', '?')}, Python {env.get('python', '?')}",
        f"- command: `{summary['command']}`",
        f"- budget {summary['budget_s']:.0f} s, total {summary['total_s']:.0f} s; "
        f"stages ok {summary['counts'].get('ok', 0)}, failed {summary['counts'].get('failed', 0)}, "
        f"timeout {summary['counts'].get('timeout', 0)}, skipped {summary['counts'].get('skipped', 0)}",
        "",
        "| stage | status | seconds / limit | what |",
        "|---|---|---|---|",
    ]
    for s in summary["stages"]:
        status = s["status"] + (f" ({s['reason']})" if s.get("reason") else "")
        if s.get("rc") not in (0, None):
            status += f", rc {s['rc']}"
        timing = f"{s['seconds']:.0f} / {s['limit_s']}" if "seconds" in s else "-"
        lines.append(f"| {s['name']} | {status} | {timing} | {s['what']} |")

    trains = [s for s in summary["stages"] if s["name"].startswith("train_") and s.get("results")]
    if trains:
        lines += ["", "## Training (median of the log windows after the first)", ""]
        lines += ["| run | params (M) | tokens/s | MFU | peak mem (GiB) | step (s) | final loss | steps logged |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for s in trains:
            r = s["results"]
            mfu = f"{r['mfu']:.1%}" if isinstance(r.get("mfu"), float) else "-"
            lines.append(
                f"| {s['name'][6:]} | {fmt(r.get('params_m'))} | {fmt(r.get('tokens_per_s'))} | {mfu} | "
                f"{fmt(r.get('peak_mem_gib'))} | {fmt(r.get('step_time_s'))} | {fmt(r.get('final_train_loss'))} | "
                f"{r.get('logged_steps')} |"
            )
        sources = {s["results"].get("peak_mem_source") for s in trains} - {None}
        if sources:
            lines.append(f"\nPeak memory from: {', '.join(sorted(sources))}.")

    for s in summary["stages"]:
        rows = s.get("results", {}).get("rows")
        if not rows:
            continue
        cols = [c for c in rows[0] if c not in ("device", "dtype", "heads", "decay")][:12]
        lines += ["", f"## {s['name']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]

    tests = next((s for s in summary["stages"] if s["name"] == "gpu_tests"), None)
    if tests and tests.get("results"):
        lines += ["", f"## gpu_tests: {json.dumps(tests['results'])}"]
    imports = summary.get("imports") or {}
    if imports:
        lines += [
            "",
            f"## Imports ({imports.get('processes', 0)} processes traced)",
            "",
            f"- third-party distributions imported: {len(imports.get('distributions', {}))}; imported by this "
            f"repository's code but on neither the image nor the carried wheels: {imports.get('problems') or 'none'}",
            f"- on neither, imported by other packages (their optional imports): {len(imports.get('transitive', []))}"
            f"; listed as not needed but imported: {imports.get('not_needed_but_imported') or 'none'}",
        ]
    bad = [s for s in summary["stages"] if s["status"] in ("failed", "timeout")]
    for s in bad:
        lines += ["", f"## {s['name']}: {s['status']} (log tail)", "", "```", *s.get("log_tail", [])[-15:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="summary.json, summary.md and logs.tar.gz go here")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same stages at tiny sizes on CPU")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all stages (GPU 450, dry run 420)")
    ap.add_argument("--only", help="comma-separated stages to run (env, install and data are added as needed)")
    ap.add_argument("--skip", help="comma-separated stages not to run")
    ap.add_argument("--work", type=Path, help="scratch folder (data, runs, logs); default: a new one in /tmp")
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    args = ap.parse_args(argv)
    args.budget = args.budget or DEFAULT_BUDGET_S["cpu" if args.cpu_dry_run else "gpu"]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    t0 = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="fm_gpu_check_"))
    for sub in ("logs", "imports"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    stages = build_stages(args, work)
    if args.list:
        for s in stages:
            print(f"{s.name:24s} {s.skip or shlex.join(s.cmd or [])}")
        return 0
    select(stages, args.only, args.skip)
    env = stage_env(args, work)
    print(f"[gpu_check] {'CPU dry run' if args.cpu_dry_run else 'GPU'}; work {work}; budget {args.budget:.0f} s")
    run_stages(stages, args, work, env)

    classify = subprocess.run(
        [PY, str(HERE / "wheel_imports.py"), "classify", str(work / "imports")],
        capture_output=True,
        text=True,
        env={**env, "FM_GPU_CHECK_TRACE": ""},
        cwd=REPO,
        timeout=60,
    )
    try:
        imports = json.loads(classify.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        imports = {"error": (classify.stderr or classify.stdout)[-2000:]}
    counts: dict[str, int] = {}
    for s in stages:
        counts[s.result["status"]] = counts.get(s.result["status"], 0) + 1
    summary = {
        "started": started,
        "cpu_dry_run": args.cpu_dry_run,
        "command": shlex.join(["scripts/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
        "budget_s": args.budget,
        "total_s": round(time.monotonic() - t0, 1),
        "counts": counts,
        "stages": [s.result for s in stages],
        "imports": imports,
        "work": str(work),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    markdown = summary_markdown(summary)
    (args.out_dir / "summary.md").write_text(markdown)
    with tarfile.open(args.out_dir / "logs.tar.gz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
        for s in stages:
            if s.run_dir is not None and (s.run_dir / "metrics.jsonl").is_file():
                tar.add(s.run_dir / "metrics.jsonl", arcname=f"runs/{s.name}.metrics.jsonl")
    print(markdown, flush=True)
    return 1 if counts.get("failed") or counts.get("timeout") else 0


if __name__ == "__main__":
    sys.exit(main())
