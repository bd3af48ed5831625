"""Failures on real 2-rank CPU (gloo) runs of fm_pretrain/train.py under torchrun, as users start it.

One uninterrupted reference run (ZeRO-2, a checkpoint every step) is compared against
- a chain of interrupted runs in one run directory: killed in the middle of a save, `kill -9` of one rank (the
  job must exit non-zero within train.collective_timeout_s), of the whole job, of the other rank (three kill points
  drawn with a seeded RNG), SIGUSR1 (checkpoint and exit 0), then a resume to the end: every logged loss is
  bit-identical (fp32) to the reference, and metrics.jsonl holds every step once (the replayed ones are rewound);
- resumes of a reference checkpoint at DP=1 and under ZeRO-3 (the global batch kept by grad_accum), and of a
  ZeRO-3 run's checkpoint under ZeRO-1 (at DP=1) and ZeRO-2;
- a resume with other data (a blend instead of the packed directory) stops with an error naming what changed;
- a run with injected non-finite losses: skipped, counted, and N in a row stop the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from fm_pretrain.checkpoint import latest_tag, read_meta
from fm_pretrain.checkpoint.__main__ import main as convert
from fm_pretrain.launch import train_command, train_env
from fm_pretrain.testing import faults
from fm_pretrain.testing.faults import fault_env
from tests.helpers.paths import REPO
from tests.helpers.train_runs import TINY_FM_ATTENTION

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs" / "demo_tiny.yaml"
STEPS = 14
TIMEOUT_S = 60  # train.collective_timeout_s of the chain: a dead rank must end the job within it
SMALL = [
    *TINY_FM_ATTENTION,
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "train.log_every=1",
    "train.val_every=1000",
    "train.val_batches=2",
    "train.save_every=1",
    "train.keep_last=100",
    "optim.warmup_steps=2",
    "tracking.enabled=false",
    "train.ds_config=ds_configs/zero2.json",
]
ZERO3 = "train.ds_config=ds_configs/zero3.json"


def start(packed: Path, run_dir: Path, *overrides: str, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    args = [f"data.path={packed / 'packed'}", f"data.tokenizer={packed / 'tokenizer.model'}"]
    args.append(f"train.run_dir={run_dir}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")  # noqa: SIM115 (closed with the process)
    cmd = train_command(CONFIG, [*args, *SMALL, *overrides], nproc)
    # One thread per rank whatever nproc (torchrun sets it only for nproc > 1): runs of different DP sizes are
    # compared to 1e-12, so each should do the same per-rank arithmetic. A full run once saw one micro-batch loss
    # 1 fp32 ulp apart between the 1-rank run (then on 2 threads) and the 2-rank reference, under heavy load; the
    # cause was not pinned down, and equal thread counts remove the one difference the two launches had.
    return subprocess.Popen(cmd, env=train_env({"OMP_NUM_THREADS": "1", **(env or {})}), stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def kill_job(proc: subprocess.Popen) -> None:
    """kill -9 of torchrun and its workers (torchrun starts them in their own process groups)."""
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise


def log_tail(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text()[-4000:]


def rows(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def latest_step(run_dir: Path) -> int:
    try:
        tag = latest_tag(run_dir / "checkpoints")
    except FileNotFoundError:
        return 0
    return int(tag.split("_")[1]) if tag else 0


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, started_at: int) -> int:
    """Block until this run (started from checkpoint `started_at`) has saved a step >= `step`; returns it."""
    step = max(step, started_at + 1)
    deadline = time.monotonic() + 300
    while (got := latest_step(run_dir)) < step:
        assert proc.poll() is None, f"the run ended before step {step} was saved:\n{log_tail(run_dir)}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    return got


def worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and child.environ().get("LOCAL_RANK") is not None:
                return child
        except psutil.Error:  # a short-lived helper process that is gone already
            continue
    raise AssertionError(f"no worker process with RANK={rank}")


def uninterrupted(packed: Path, run_dir: Path, steps: int, *overrides: str) -> tuple[Path, dict[int, float]]:
    """A run from scratch to `steps` (a checkpoint every step): its directory and {step: train/loss}."""
    assert finish(start(packed, run_dir, f"train.steps={steps}", *overrides)) == 0, log_tail(run_dir)
    losses = dict(rows(run_dir))
    assert sorted(losses) == list(range(1, steps + 1))
    return run_dir, losses


@pytest.fixture(scope="module")
def reference(packed, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    return uninterrupted(packed, tmp_path_factory.mktemp("reference") / "run", STEPS)


@pytest.fixture(scope="module")
def reference_zero3(packed, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The reference's run under ZeRO-3 (DP 2), to step 7: the source of the ZeRO-3 -> ZeRO 1/2 reshards."""
    return uninterrupted(packed, tmp_path_factory.mktemp("reference_zero3") / "run", 7, ZERO3)


def test_interrupted_runs_resume_bit_identically(packed, tmp_path, reference):
    _, want = reference
    run_dir = tmp_path / "chain"
    opts = (f"train.steps={STEPS}", f"train.collective_timeout_s={TIMEOUT_S}")
    slow = fault_env(step_delay_s=0.3)  # so that the test, polling, interrupts near the step it chose
    rng = random.Random(5)
    kills = [rng.choice([3, 4]), rng.choice([6, 7]), rng.choice([8, 9])]

    # 1. Rank 0 dies in the middle of saving step 2 (after DeepSpeed wrote the temporary tag directory).
    rc = finish(start(packed, run_dir, *opts, env=fault_env(crash_in_save=2)))
    assert rc != 0
    assert re.search(rf"exitcode\s*:\s*{faults.CRASH_EXIT_CODE}\b", log_tail(run_dir)), "not the injected crash"
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_1", "the pointer moved before the save was complete"
    assert (ckpt / "step_2.tmp").is_dir() and not (ckpt / "step_2").exists()

    # 2-4. kill -9 at three steps: rank 1 alone (a dead rank), the whole job, rank 0 alone.
    for kill_step, target in zip(kills, ["rank1", "job", "rank0"], strict=True):
        proc = start(packed, run_dir, *opts, env=slow)
        wait_for_checkpoint(proc, run_dir, kill_step, latest_step(run_dir))
        if target == "job":
            kill_job(proc)
            continue
        worker(proc, int(target[-1])).kill()
        t0 = time.monotonic()
        rc = finish(proc, timeout=TIMEOUT_S + 30)
        assert rc != 0, "the job survived the death of a rank"
        assert time.monotonic() - t0 < TIMEOUT_S, "a dead rank did not end the job within the collective timeout"
    assert not (ckpt / "step_2.tmp").exists(), "the leftover of the interrupted save was not cleaned up"

    # 5. SIGUSR1 to rank 0 only: both ranks save at the next step boundary and exit 0.
    proc = start(packed, run_dir, *opts, env=slow)
    wait_for_checkpoint(proc, run_dir, kills[-1] + 2, latest_step(run_dir))
    worker(proc, 0).send_signal(signal.SIGUSR1)
    assert finish(proc) == 0, log_tail(run_dir)
    stopped_at = latest_step(run_dir)
    assert stopped_at < STEPS, "the run finished before the signal arrived; the test did not test SIGUSR1"
    assert "stop signal" in log_tail(run_dir)
    assert max(s for s, _ in rows(run_dir)) == stopped_at, "steps ran after the stop signal"

    # 6. Resume to the end. Each resume rewound metrics.jsonl to its checkpoint: one clean history.
    assert finish(start(packed, run_dir, *opts)) == 0, log_tail(run_dir)
    got = rows(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), f"steps logged: {[s for s, _ in got]} (kills at {kills})"
    assert [s for s, _ in rows(run_dir, "val/loss")] == [0, STEPS]
    for step, loss in got:
        assert loss == want[step], f"step {step}: {loss!r} != uninterrupted {want[step]!r} (kills at {kills})"


def _module(step_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_checkpoint_reshards_to_dp1_and_zero3(packed, tmp_path, reference):
    ref_dir, want = reference
    step = 5
    step_dir = ref_dir / "checkpoints" / f"step_{step}"

    # Offline: the layout-free form, and full fp32 weights equal to the ones DeepSpeed saved (ZeRO-2 saves them).
    assert convert(["universal", str(step_dir)]) == 0
    assert convert(["export", str(step_dir), "--output", str(tmp_path / "w.pt")]) == 0
    exported = torch.load(tmp_path / "w.pt")
    model_states = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)
    params = {name for group in model_states["param_shapes"] for name in group}
    # Every parameter, plus aliases of tied ones (lm_head.weight = embed.weight), as in a model's state_dict.
    assert params <= set(exported) <= set(model_states["module"])
    for name, tensor in exported.items():
        assert torch.equal(tensor, model_states["module"][name]), name

    # DP 2 -> 1 with grad_accum 2 -> 4 (same global batch); ZeRO-2 -> ZeRO-3 at DP 2.
    layouts = {"dp1": (["train.grad_accum=4"], 1), "zero3": ([ZERO3], 2)}
    resume_at_other_layouts(packed, tmp_path, step_dir, want, layouts)


def test_zero3_checkpoint_reshards_to_zero1_and_zero2(packed, tmp_path, reference_zero3):
    """DeepSpeed's universal form of a ZeRO-3 checkpoint lacks what ZeRO 1/2 load (shaped tensors, the Adam step
    of each parameter, the model-states file name, ds_version); fm_pretrain.checkpoint.reshard fills it in."""
    ref_dir, want = reference_zero3
    step_dir = ref_dir / "checkpoints" / "step_5"
    # ZeRO-3 -> ZeRO-1 at DP 1 (grad_accum 2 -> 4, same global batch); ZeRO-3 -> ZeRO-2 at DP 2.
    layouts = {
        "zero1_dp1": (["train.ds_config=ds_configs/zero1.json", "train.grad_accum=4"], 1),
        "zero2": (["train.ds_config=ds_configs/zero2.json"], 2),
    }
    resume_at_other_layouts(packed, tmp_path, step_dir, want, layouts)


def resume_at_other_layouts(packed: Path, tmp_path: Path, step_dir: Path, want: dict[int, float], layouts: dict):
    """Resume `step_dir` (a checkpoint of the uninterrupted run whose losses are `want`) once per layout
    {name: (overrides, nproc)}, for two steps, and compare the losses with the uninterrupted run's."""
    step = int(read_meta(step_dir)["step"])
    for name, (extra, nproc) in layouts.items():
        run_dir = tmp_path / name
        proc = start(packed, run_dir, f"train.steps={step + 2}", f"train.resume_from={step_dir}", *extra, nproc=nproc)
        assert finish(proc) == 0, log_tail(run_dir)
        got = dict(rows(run_dir))
        assert sorted(got) == [step + 1, step + 2]
        # The first loss after the resume is a forward of the loaded weights on the same samples: only the order
        # of summing micro-batch means differs (float64). The next one follows an update whose gradients were
        # reduced in another order (DP) or partitioned differently (ZeRO-3): fp32 rounding, as ZeRO 0-3 agree.
        assert got[step + 1] == pytest.approx(want[step + 1], rel=1e-12, abs=0), name
        assert got[step + 2] == pytest.approx(want[step + 2], rel=1e-5, abs=0), name
        assert "resharding" in (run_dir.parent / f"{run_dir.name}.log").read_text()


def test_resuming_with_other_data_is_an_error_naming_the_change(packed, tmp_path, reference):
    ref_dir, _ = reference
    step_dir = ref_dir / "checkpoints" / "step_5"
    blend = tmp_path / "blend.yaml"  # the same packed data, blended with itself: another sample order
    blend.write_text("train:\n" + "".join(f"- {{path: {packed / 'packed'}, weight: {w}}}\n" for w in (1, 3)))
    run_dir = tmp_path / "blend"
    proc = start(packed, run_dir, "train.steps=6", f"train.resume_from={step_dir}", f"data.blend={blend}",
                 "data.path=''", nproc=1)  # fmt: skip
    assert finish(proc) != 0
    out = log_tail(run_dir)
    assert f"error: {step_dir / 'meta.json'}: the checkpoint was trained on other data" in out
    assert "sampler: 'global' -> 'blend'; sources: 1 -> 2" in out and "train.allow_data_change=true" in out
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("zero", [2, 0])  # ZeRO 1-3: DeepSpeed's overflow check; ZeRO-0: SkipNonFiniteAdamW
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(packed, tmp_path, zero):
    run_dir = tmp_path / "nan"
    env = fault_env(nonfinite_loss=[2, 4, 5, 6])
    opts = ("train.steps=10", "train.max_consecutive_nonfinite=3", f"train.ds_config=ds_configs/zero{zero}.json")
    proc = start(packed, run_dir, *opts, env=env)
    rc = finish(proc)
    assert rc != 0, "three non-finite steps in a row did not stop the run"
    out = log_tail(run_dir)
    assert "3 consecutive non-finite steps (train.max_consecutive_nonfinite=3), the last at step 6" in out
    skipped = dict(rows(run_dir, "train/skipped_steps"))
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 2, 5: 3}  # step 6 raised before logging
    losses = dict(rows(run_dir))
    assert all(math.isnan(losses[s]) for s in (2, 4, 5)) and math.isfinite(losses[3])  # a window of skips: NaN
    # "Skipped" means no update at all: weights after step 2 are those after step 1; step 3 trained.
    ckpt = run_dir / "checkpoints"
    w1, w2, w3 = (_module(ckpt / f"step_{s}") for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    assert latest_step(run_dir) == 5
