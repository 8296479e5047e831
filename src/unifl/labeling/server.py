"""A real local Label Studio server, in its own virtual environment.

Label Studio pins a protobuf that conflicts with kfp's, so it never enters the
project's environment: it is installed on first use (`pip install
label-studio==<version>` from the package registry) into a virtual environment
under a cache directory, and the project talks to it only over HTTP.

The same code serves `unifl labeling serve` (trying annotation by hand) and the
integration tests' session fixture. The server listens on 127.0.0.1 only, with
local-file serving enabled under a document root, a known admin user and a
legacy API token (LABEL_STUDIO_USERNAME / PASSWORD / USER_TOKEN with
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true). The credentials are generated once
per data directory and kept there in a file only its owner can read, so a
restarted server keeps working with the same token.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

LABEL_STUDIO_VERSION = "1.23.2"
"""The server release installed by default (the SDK 2.1 pairs with 1.23)."""

INSTALLED_STAMP = ".unifl-installed"
CREDENTIALS_FILE = "credentials.json"
TOKEN_FILE = "api-token"
DATABASE_FILE = "label_studio.sqlite3"
TEMPLATE_STAMP = ".unifl-template"
ADMIN_USERNAME = "admin@unifl.local"


class LabelStudioServerError(RuntimeError):
    """The local server could not be installed or did not come up; the message says why."""


@dataclass(frozen=True)
class ServerCredentials:
    """Login of the local admin user; the repr never shows the password or the token."""

    username: str
    password: str = field(repr=False)
    token: str = field(repr=False)
    secret_key: str = field(repr=False, default="")

    @classmethod
    def generate(cls, username: str = ADMIN_USERNAME) -> ServerCredentials:
        # The legacy token is stored in a 40-character column. A fixed Django
        # SECRET_KEY keeps sessions and personal access tokens valid across restarts.
        return cls(
            username=username,
            password=secrets.token_urlsafe(12),
            token=secrets.token_hex(20),
            secret_key=secrets.token_urlsafe(48),
        )


def load_or_create_credentials(data_dir: str | Path) -> ServerCredentials:
    """The credentials kept in `data_dir` (created with mode 0600 on first use).

    LABEL_STUDIO_USERNAME / LABEL_STUDIO_PASSWORD / LABEL_STUDIO_USER_TOKEN in the
    environment take precedence on first use, so a user can choose their own.
    """
    path = Path(data_dir) / CREDENTIALS_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            return ServerCredentials(
                stored["username"],
                stored["password"],
                stored["token"],
                stored.get("secret_key", ""),
            )
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LabelStudioServerError(
                f"{path}: unreadable credentials file; remove the data directory "
                f"{path.parent} to start a fresh server"
            ) from None
    generated = ServerCredentials.generate()
    credentials = ServerCredentials(
        username=os.environ.get("LABEL_STUDIO_USERNAME") or generated.username,
        password=os.environ.get("LABEL_STUDIO_PASSWORD") or generated.password,
        token=os.environ.get("LABEL_STUDIO_USER_TOKEN") or generated.token,
        secret_key=generated.secret_key,
    )
    if not 5 < len(credentials.token) <= 40:
        raise LabelStudioServerError("LABEL_STUDIO_USER_TOKEN must have 6 to 40 characters")
    _write_private(path.parent / TOKEN_FILE, credentials.token + "\n")
    _write_private(
        path,
        json.dumps(
            {
                "username": credentials.username,
                "password": credentials.password,
                "token": credentials.token,
                "secret_key": credentials.secret_key,
            }
        ),
    )
    return credentials


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def server_venv_dir(cache_dir: str | Path, version: str = LABEL_STUDIO_VERSION) -> Path:
    return Path(cache_dir) / f"venv-{version}"


def ensure_tool_venv(
    venv: str | Path, requirements: list[str], executable: str, quiet: bool = False
) -> Path:
    """Path of `executable` in a virtual environment holding `requirements`, made if needed.

    For tools that must not share the project's environment (Label Studio, test
    servers). The install is guarded by a file lock (two test sessions may race)
    and marked complete by a stamp file written last, so an interrupted install
    is redone instead of half-used.
    """
    venv = Path(venv).resolve()
    program = venv / "bin" / executable
    stamp = venv / INSTALLED_STAMP
    if stamp.is_file() and program.is_file():
        return program
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and program.is_file():
            return program
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        if not quiet:
            print(
                f"Installing {' '.join(requirements)} into {venv} (first use only; a few minutes)...",
                file=sys.stderr,
                flush=True,
            )
        _run_or_raise([sys.executable, "-m", "venv", str(venv)], f"creating {venv}")
        _run_or_raise(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
            f"installing {' '.join(requirements)}",
        )
        if not program.is_file():
            raise LabelStudioServerError(f"{program} missing after installing {requirements}")
        elapsed = time.monotonic() - started
        stamp.write_text(f"{' '.join(requirements)} installed in {elapsed:.0f} s\n")
        if not quiet:
            print(
                f"Installed {' '.join(requirements)} in {elapsed:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return program


def ensure_server_installed(
    cache_dir: str | Path, version: str = LABEL_STUDIO_VERSION, quiet: bool = False
) -> Path:
    """Path of the `label-studio` executable, installed from the registry on first use."""
    venv = server_venv_dir(Path(cache_dir).resolve(), version)
    return ensure_tool_venv(venv, [f"label-studio=={version}"], "label-studio", quiet=quiet)


def _run_or_raise(command: list[str], what: str) -> None:
    process = subprocess.run(command, capture_output=True, text=True, check=False)
    if process.returncode != 0:
        tail = (process.stdout + process.stderr)[-3000:]
        raise LabelStudioServerError(f"{what} failed (exit {process.returncode}):\n{tail}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def server_environment(
    data_dir: Path, document_root: Path, credentials: ServerCredentials
) -> dict[str, str]:
    """Environment of the server process: local files, known user, legacy token, no phoning home."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": credentials.username,
            "LABEL_STUDIO_PASSWORD": credentials.password,
            "LABEL_STUDIO_USER_TOKEN": credentials.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LOG_LEVEL": "WARNING",
            "JSON_LOG": "0",
        }
    )
    if credentials.secret_key:
        env["SECRET_KEY"] = credentials.secret_key
    return env


class LabelStudioServer:
    """A running server process (its own process group); `stop()` ends the whole group."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        url: str,
        credentials: ServerCredentials,
        data_dir: Path,
        document_root: Path,
        log_path: Path,
    ) -> None:
        self.process = process
        self.url = url
        self.credentials = credentials
        self.data_dir = data_dir
        self.document_root = document_root
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"LabelStudioServer(url={self.url!r}, pid={self.process.pid}, data_dir={str(self.data_dir)!r})"

    @property
    def token_path(self) -> Path:
        """File (mode 0600) holding the admin's API token, for `labeling.token_file`."""
        return self.data_dir / TOKEN_FILE

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server's process group (the server forks workers)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)

    def __enter__(self) -> LabelStudioServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_for_health(
    url: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `<url>/health` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    with tqdm(
        total=int(timeout), desc="waiting for Label Studio", unit="s", leave=False, disable=None
    ) as bar:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise LabelStudioServerError(
                    f"Label Studio exited with code {process.returncode} before {url} was healthy"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            time.sleep(1.0)
            bar.n = min(int(timeout), int(timeout - (deadline - time.monotonic())))
            bar.refresh()
    raise LabelStudioServerError(
        f"Label Studio at {url} not healthy after {timeout:.0f} s ({last_error})"
    )


def start_server(
    data_dir: str | Path,
    document_root: str | Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    cache_dir: str | Path = ".cache/label-studio",
    version: str = LABEL_STUDIO_VERSION,
    startup_timeout: float = 300.0,
    template_dir: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> LabelStudioServer:
    """Install if needed, start Label Studio on `host:port` and wait until it is healthy.

    `port=None` picks a free port. The first start of a data directory runs the
    database migrations (about two minutes on 2 cores). With `template_dir`, an
    empty data directory is seeded from a snapshot of a freshly migrated one
    (made there on the first start), which brings later starts down to seconds;
    the snapshot holds only the admin user and its credentials. `extra_env` adds
    or overrides server settings (e.g. SSRF_PROTECTION_ENABLED for a test S3 on
    loopback).
    """
    data_dir = Path(data_dir).resolve()
    document_root = Path(document_root).resolve()
    if not document_root.is_dir():
        raise LabelStudioServerError(f"document root {document_root} is not a directory")
    executable = ensure_server_installed(cache_dir, version)
    data_dir.mkdir(parents=True, exist_ok=True)
    if any(
        os.environ.get(f"LABEL_STUDIO_{name}") for name in ("USERNAME", "PASSWORD", "USER_TOKEN")
    ):
        template_dir = None  # the user chose credentials: the template's would override them
    seeded = template_dir is not None and seed_from_template(data_dir, Path(template_dir))
    credentials = load_or_create_credentials(data_dir)
    port = port or free_port(host)
    if not _port_is_free(host, port):
        raise LabelStudioServerError(f"port {port} on {host} is already in use")
    url = f"http://{host}:{port}"
    log_path = data_dir / "server.log"
    log = log_path.open("ab")
    command = [
        str(executable),
        "start",
        "--no-browser",
        "--internal-host",
        host,
        "--port",
        str(port),
        "--enable-legacy-api-token",
    ]
    process = subprocess.Popen(
        command,
        env={**server_environment(data_dir, document_root, credentials), **(extra_env or {})},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data_dir,
        start_new_session=True,
    )
    log.close()
    server = LabelStudioServer(process, url, credentials, data_dir, document_root, log_path)
    try:
        wait_for_health(url, startup_timeout, process)
    except BaseException as exc:
        server.stop()
        if isinstance(exc, LabelStudioServerError):
            raise LabelStudioServerError(
                f"{exc}\n--- {log_path} (tail) ---\n{server.log_tail()}"
            ) from None
        raise
    if template_dir is not None and not seeded:
        save_template(server, Path(template_dir))
    return server


def save_template(server: LabelStudioServer, template_dir: Path) -> None:
    """Snapshot a freshly started server's database and credentials (online sqlite backup)."""
    import sqlite3

    database = server.data_dir / DATABASE_FILE
    if not database.is_file():
        return
    template_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{template_dir.name}.", dir=template_dir.parent))
    source = sqlite3.connect(database)
    target = sqlite3.connect(staging / DATABASE_FILE)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    for name in (CREDENTIALS_FILE, TOKEN_FILE, ".env"):
        if (server.data_dir / name).is_file():
            shutil.copy2(server.data_dir / name, staging / name)
    (staging / TEMPLATE_STAMP).write_text("complete\n")
    if (template_dir / TEMPLATE_STAMP).is_file():
        shutil.rmtree(staging, ignore_errors=True)  # another session saved one meanwhile
        return
    shutil.rmtree(template_dir, ignore_errors=True)
    try:
        os.replace(staging, template_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def seed_from_template(data_dir: Path, template_dir: Path) -> bool:
    """Copy a template into an empty data directory; False when there is nothing to copy."""
    if not (template_dir / TEMPLATE_STAMP).is_file() or (data_dir / DATABASE_FILE).exists():
        return False
    for name in (DATABASE_FILE, CREDENTIALS_FILE, TOKEN_FILE, ".env"):
        if (template_dir / name).is_file():
            shutil.copy2(template_dir / name, data_dir / name)
    return True


@contextlib.contextmanager
def running_server(
    data_dir: str | Path, document_root: str | Path, **kwargs: object
) -> Iterator[LabelStudioServer]:
    """`start_server` as a context manager that always stops the process group."""
    server = start_server(data_dir, document_root, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
