"""A real MLflow tracking server on 127.0.0.1 for the integration tests.

Started with the project's own launch script (mlflow/server.sh) so the script is exercised
too: SQLite backend and a served artifact store in a temporary directory, one worker, a free
port. The server runs in its own process group, which is terminated as a whole afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

REPOSITORY = Path(__file__).resolve().parents[2]
LAUNCH_SCRIPT = REPOSITORY / "mlflow" / "server.sh"


@dataclass(frozen=True)
class MlflowServer:
    url: str
    root: Path
    log_file: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log_file: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@contextlib.contextmanager
def running_mlflow_server(root: Path, timeout_s: float = 120.0) -> Iterator[MlflowServer]:
    """Start the server under `root`, wait for /health, yield it, stop its process group."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = root / "server.log"
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow"),
    }
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            ["bash", str(LAUNCH_SCRIPT)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {process.returncode}:\n{_log_tail(log_file)}"
                )
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {timeout_s} s:\n"
                                   f"{_log_tail(log_file)}")  # fmt: skip
            time.sleep(0.25)
        yield MlflowServer(url=url, root=root, log_file=log_file)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
