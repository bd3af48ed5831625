"""The sbatch launcher on a real single-node Slurm cluster (slurmctld + slurmd + munged on localhost, as root).

The module fixture starts its own munged and Slurm daemons with every state, spool, socket and log file in a
temp dir and private ports, so it touches neither /etc/slurm nor a system munged; it stops them by PID. Jobs
submit the real `slurm/pretrain_1b.sh`, overriding its GPU-node resources on the sbatch command line. Besides
training runs, a stop signal sent with scancel (to the batch shell, as `#SBATCH --signal=B:USR1@T` does, or to the
job step) must checkpoint, end the job cleanly and requeue it, and the requeued job resume from that checkpoint.
Needs: root, and `apt-get install -y slurm-wlm munge` (Debian/Ubuntu); skipped otherwise.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from fm_pretrain.training.guards import STEP_DELAY_ENV
from tests.helpers.paths import REPO
from tests.helpers.train_runs import TINY_FM_ATTENTION

pytestmark = pytest.mark.slow
SCRIPT = REPO / "slurm" / "pretrain_1b.sh"
FAKE_GPUS = 2
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
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
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.save_every=3",
    "optim.warmup_steps=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}:\n{p.read_text()[-2000:] if p.exists() else '(missing)'}" for p in logs)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{tails}")


class Cluster:
    def __init__(self, root: Path, munge_dir: Path):
        self.root, self.munge_dir = root, munge_dir
        self.host = socket.gethostname().split(".")[0]  # NodeName and SlurmctldHost must be `hostname -s`
        self.conf = root / "slurm.conf"
        # The script must choose the accelerator itself: drop what conftest sets for in-process tests.
        self.env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        daemons = ("munged", "slurmctld", "slurmd")
        self.logs = [root / f"{d}.stderr" for d in daemons] + [root / "slurmctld.log", root / "slurmd.log"]

    def cmd(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        try:
            out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            if check:
                raise
            return ""
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def start(self) -> None:
        # munged refuses to run as root and checks that its key and dirs belong to its user, so it gets its own
        # dir (not under pytest's root-only tmp dir) and runs as user munge with a fresh key.
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_dir.chmod(0o755)  # munged insists that everyone can reach its socket dir
        shutil.chown(self.munge_dir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        socket_path = self.munge_dir / "munge.socket"
        m = self.munge_dir
        self.spawn(
            ["munged", "--foreground", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={m / 'pid'}",
             f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}"],
            user="munge",
        )  # fmt: skip
        wait_for("munged", socket_path.exists, 20, self.logs)

        for d in ("state", "spool"):
            (self.root / d).mkdir()
        r = self.root
        # Two fake GPUs (plain files): a job asking for --gres=gpu:2 gets SLURM_GPUS_ON_NODE=2 as on a GPU
        # node; without CUDA, training still runs on CPU.
        for i in range(FAKE_GPUS):
            (r / f"fakegpu{i}").touch()
        (r / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={r}/fakegpu[0-{FAKE_GPUS - 1}]\n")
        self.conf.write_text(
            f"""ClusterName=fmtest
SlurmctldHost={self.host}
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
GresTypes=gpu
ReturnToService=2
EnforcePartLimits=ALL
NodeName={self.host} CPUs={os.cpu_count()} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )
        self.spawn(["slurmctld", "-D", "-i"])
        wait_for("slurmctld", lambda: "UP" in self.cmd("scontrol", "ping", check=False), 30, self.logs)
        self.spawn(["slurmd", "-D"])
        idle = lambda: self.cmd("sinfo", "-h", "-o", "%t", check=False).strip() == "idle"
        wait_for("the node", idle, 60, self.logs)

    def spawn(self, args: list[str], user: str | None = None) -> None:
        log = open(self.root / f"{Path(args[0]).name}.stderr", "w")  # noqa: SIM115 (closed with the daemon)
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, user=user)
        log.close()
        self.procs.append(proc)

    def stop(self) -> None:
        if len(self.procs) == 3:  # jobs first: their slurmstepd would outlive slurmd
            self.cmd("scancel", "--full", "--user=root", check=False)
            empty = lambda: not self.cmd("squeue", "-h", check=False).strip()
            with contextlib.suppress(TimeoutError):  # stop the daemons regardless
                wait_for("an empty queue", empty, 30, self.logs)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def submit(self, *args: str, env: dict[str, str], cwd: Path = REPO) -> str:
        env = {"MASTER_PORT": str(free_port()), **env}  # job ids restart at 1 in each test cluster
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **env}, cwd=cwd,
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        return out.stdout.strip().split(";")[0]

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Polls squeue until the job leaves the queue (no sbatch --wait: it can hang), then reads its record."""
        deadline = time.monotonic() + timeout
        while self.cmd("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip():
            if time.monotonic() > deadline:
                self.cmd("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still queued or running after {timeout:.0f} s")
            time.sleep(1)
        # No accounting database: slurmctld keeps finished jobs for MinJobAge (300 s); scontrol has the exit code.
        record = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", record))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root (slurmd must); run as root")
    munge_dir = Path(tempfile.mkdtemp(prefix="fm-test-munge-"))
    c = Cluster(tmp_path_factory.mktemp("slurm"), munge_dir)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(munge_dir, ignore_errors=True)


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
    env = {"CONFIG": "configs/demo_tiny.yaml", "RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2", STEP_DELAY_ENV: "0.5"}
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
