"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd on localhost, as root.

Every state, spool, socket and log file lives in a temp dir with private ports, so it touches neither
/etc/slurm nor a system munged; the daemons are stopped by PID. The node has 2 fake GPUs (plain files as GRES),
so a job asking for --gres=gpu:2 sees SLURM_GPUS_ON_NODE=2 as on a GPU node. Used through the module-scoped
`cluster` fixture of tests/e2e/conftest.py (tests/e2e/test_slurm.py, tests/e2e/test_study.py).
Needs: root, and `apt-get install -y slurm-wlm munge` (Debian/Ubuntu); `slurm_cluster` skips otherwise.
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

FAKE_GPUS = 2
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


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

    def wait_jobs(self, job_ids: list[str], timeout: float, poll_s: float = 2.0) -> dict[str, dict[str, str]]:
        """Polls every job until all have ended (state no longer PENDING/RUNNING/...), recording each job's
        record as it ends: slurmctld forgets a finished job after MinJobAge (300 s), and a chain of jobs can
        take longer than that. On the deadline the jobs still alive are cancelled and TimeoutError names them."""
        live = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}
        done: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + timeout
        while True:
            for job_id in [j for j in job_ids if j not in done]:
                record = dict(re.findall(r"(\w+)=(\S*)", self.cmd("scontrol", "show", "job", "-o", job_id)))
                if record.get("JobState") not in live:
                    done[job_id] = record
            if len(done) == len(job_ids):
                return done
            if time.monotonic() > deadline:
                left = [j for j in job_ids if j not in done]
                for job_id in left:
                    self.cmd("scancel", job_id, check=False)
                raise TimeoutError(f"jobs {left} still queued or running after {timeout:.0f} s; ended: "
                                   f"{ {j: r.get('JobState') for j, r in done.items()} }")  # fmt: skip
            time.sleep(poll_s)


@contextlib.contextmanager
def slurm_cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A started cluster, stopped on exit; skips the test when Slurm/munge are missing or not root."""
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
