"""The sbatch launcher on a real single-node Slurm cluster (slurmctld + slurmd + munged on localhost, as root).

The module fixture `cluster` (tests/e2e/conftest.py, tests/helpers/slurm_cluster.py) starts its own munged and
Slurm daemons with every state, spool, socket and log file in a temp dir and private ports, so it touches neither
/etc/slurm nor a system munged; it stops them by PID. Jobs
submit the real `slurm/pretrain_1b.sh`, overriding its GPU-node resources on the sbatch command line. Besides
training runs, a stop signal sent with scancel (to the batch shell, as `#SBATCH --signal=B:USR1@T` does, or to the
job step) must checkpoint, end the job cleanly and requeue it, and the requeued job resume from that checkpoint.
Needs: root, and `apt-get install -y slurm-wlm munge` (Debian/Ubuntu); skipped otherwise.
"""

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from fm_pretrain.testing.faults import fault_env
from tests.helpers.paths import REPO
from tests.helpers.slurm_cluster import FAKE_GPUS, Cluster
from tests.helpers.train_runs import TINY_FM_ATTENTION

pytestmark = pytest.mark.slow
SCRIPT = REPO / "slurm" / "pretrain_1b.sh"
# The script's defaults ask for 8 GPUs and a whole node for 48 h; this node has 2 CPUs and no GPUs.
# --oversubscribe undoes the script's --exclusive, with which Slurm hands a job all of the node's GPUs.
CPU_NODE = ["--gres=none", "--oversubscribe"]
# --time=30: the script's --signal=B:USR1@600 (stop 10 minutes before the limit) must not fire during a test.
JOB = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=30", "--mem=0"]
TINY_MODEL = [
    *TINY_FM_ATTENTION,  # its layer_pattern holds a space: checks quoting through sbatch and srun
    "train.steps=3",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.val_every=3",
    "train.val_batches=2",
    "train.save_every=3",
    "optim.warmup_steps=1",
]


@pytest.mark.parametrize(
    ("resources", "env", "gpus"),
    [
        pytest.param(CPU_NODE, {"NPROC_PER_NODE": "2"}, 0, id="cpu-node"),
        # Ranks default to the GPUs Slurm allocates, as on a real GPU cluster.
        pytest.param([f"--gres=gpu:{FAKE_GPUS}"], {}, FAKE_GPUS, id="gpu-gres"),
    ],
)
def test_sbatch_trains_and_checkpoints(cluster, packed, tmp_path, resources, env, gpus):
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm-%j.out"
    data = [f"data.path={packed / 'packed'}", f"data.tokenizer={packed / 'tokenizer.model'}"]
    env = {"CONFIG": "configs/demo_tiny.yaml", "RUN_DIR": str(run_dir), **env}
    job_id = cluster.submit(*JOB, *resources, f"--output={log}", str(SCRIPT), *data, *TINY_MODEL, env=env)
    job = cluster.wait_job(job_id, timeout=420)
    out = Path(str(log).replace("%j", job_id))
    output = out.read_text() if out.exists() else "(no job output)"
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"job {job}\n{output[-6000:]}"

    assert f"x 2 rank(s), {gpus} GPU(s)/node;" in output
    assert ("DS_ACCELERATOR=cpu" in output) == (gpus == 0)
    assert "model.layer_pattern=[fm, attention]" in output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert all(r["train/consumed_samples"] == 4 * r["step"] for r in rows if "train/loss" in r)  # 2 ranks x 2
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_3"
    assert any((ckpt / "step_3").iterdir())
    assert (run_dir / "mlflow.db").is_file() and (run_dir / "mlflow_run_id").is_file()


def test_a_bad_override_fails_the_job_fast_with_a_clear_message(cluster, tmp_path):
    log = tmp_path / "slurm-%j.out"
    env = {"CONFIG": "configs/demo_tiny.yaml", "RUN_DIR": str(tmp_path / "run")}
    job_id = cluster.submit(*JOB, *CPU_NODE, f"--output={log}", str(SCRIPT), "train.stepz=3", env=env)
    job = cluster.wait_job(job_id, timeout=120)
    output = Path(str(log).replace("%j", job_id)).read_text()
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), f"job {job}\n{output}"
    assert "stepz" in output and "Traceback" not in output
    assert not (tmp_path / "run").exists(), "nothing should start before the config is valid"


def job_fields(cluster: Cluster, job_id: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", cluster.cmd("scontrol", "show", "job", "-o", job_id)))


def poll(what: str, check, timeout: float, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s\n{details()}"
        time.sleep(0.5)


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize(
    ("scancel", "requeue"),
    [
        # To the batch shell only, as `#SBATCH --signal=B:USR1@T` does: its trap forwards the signal to the step.
        pytest.param(["--batch", "--signal=USR1"], True, id="batch-usr1-requeue"),
        # To every process of the step (torchrun and the ranks), as `--signal=TERM@T`: torchrun must stay out of it.
        pytest.param(["--signal=TERM"], False, id="step-term"),
    ],
)
def test_a_stop_signal_checkpoints_ends_the_job_cleanly_and_requeues(cluster, packed, tmp_path, scancel, requeue):
    steps = 6
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm-%j.out"
    data = [f"data.path={packed / 'packed'}", f"data.tokenizer={packed / 'tokenizer.model'}"]
    overrides = [*data, *TINY_MODEL, f"train.steps={steps}", "train.save_every=100", "tracking.enabled=false"]
    env = {"CONFIG": "configs/demo_tiny.yaml", "RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2"}
    env.update(fault_env(step_delay_s=0.5))
    flag = "--requeue" if requeue else "--no-requeue"
    job_id = cluster.submit(*JOB, *CPU_NODE, flag, f"--output={log}", str(SCRIPT), *overrides, env=env)
    out = Path(str(log).replace("%j", job_id))
    full = lambda: out.read_text() if out.exists() else ""
    output = lambda: full()[-4000:] or "(no job output)"  # for failure messages

    state = lambda: job_fields(cluster, job_id)["JobState"]
    logged_2 = lambda: max(train_steps(run_dir), default=0) >= 2 or state() not in ("PENDING", "RUNNING")
    poll("step 2 was not logged", logged_2, 300, output)
    assert state() == "RUNNING", f"the job ended before the signal was sent\n{output()}"
    cluster.cmd("scancel", *scancel, job_id)

    if requeue:  # the job puts itself back in the queue; Slurm holds a requeued job for 2 minutes: start it now
        requeued = lambda: [job_fields(cluster, job_id)[k] for k in ("JobState", "Restarts")] == ["PENDING", "1"]
        poll(f"job {job_id} was not requeued", requeued, 120, output)
    else:
        job = cluster.wait_job(job_id, timeout=120)
        assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), output()
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= stopped_at < steps and max(train_steps(run_dir)) == stopped_at, output()
    first = full()
    assert f"saved the checkpoint of step {stopped_at}, exiting" in first
    assert "Traceback" not in first and "SignalException" not in first
    if not requeue:
        assert f"stopped at step {stopped_at} of {steps} (checkpoint saved); the job is not requeueable" in first
        return

    assert "the batch shell got SIGUSR1" in first
    assert f"stopped at step {stopped_at} of {steps} (checkpoint saved); requeueing job {job_id}" in first
    # slurmd revoked the first run's job credential at the requeue (SubmitTime), with one-second resolution: a new one
    # issued within the same second counts as revoked ("Job credential revoked"), so start it a little later.
    requeued_at = datetime.fromisoformat(job_fields(cluster, job_id)["SubmitTime"]).timestamp()
    time.sleep(max(0.0, requeued_at + 2 - time.time()))
    cluster.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = cluster.wait_job(job_id, timeout=300)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at}" in full(), output()
    assert train_steps(run_dir) == list(range(1, steps + 1))  # every step once: the resume continued the history
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps}"
