"""A real `mlflow server` for tests: loopback, a sqlite store, started and killed for real."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    from hpcbrain.process_group import free_port as pick

    return pick()


class MlflowServer:
    """`mlflow server` on loopback with a sqlite store, started and stopped for real."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        import requests

        mlflow = Path(sys.executable).with_name("mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(self.uri + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, "mlflow server exited at start"
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)     # the server and its workers
            self.proc.wait(30)
