"""A real `mlflow server` on 127.0.0.1 for tests: sqlite backend and local artifact root in a temp dir.

    with MlflowServer(tmp_path) as server:   # polls /health until it answers (deadline), stops it on exit
        client = MlflowClient(server.uri)

The server runs in a session of its own (it starts uvicorn as a child process); `stop` signals that process
group, whose id is the server's pid, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 180.0  # importing MLflow's server on a busy 2-core machine takes 30 s or more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def sqlite_uri(self) -> str:
        return f"sqlite:///{self.db}"

    def start(self) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.sqlite_uri,
               "--default-artifact-root", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]  # fmt: skip
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        tail = self.log.read_text()[-3000:]
        raise TimeoutError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{tail}")

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # the server's own session: it and its uvicorn child, nothing else

    def stop(self) -> None:
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._signal_group(signal.SIGKILL)  # a child that outlived the server

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
