"""`unifl submit` against real HTTP servers on 127.0.0.1: what a wrong host, a closed port or
missing credentials look like, and what the run creation sends.

The servers are plain `http.server` threads started by the tests. No Kubeflow Pipelines
server can run here, so where a test needs the KFP API to answer beyond its health check, a
small stand-in answers the few v2beta1 endpoints `kfp.Client` calls; everything on the
client side (kfp.Client, its HTTP client, the CLI) is the real code.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unifl.cli import app
from unifl.config import Params, load_params
from unifl.orchestration.submit import KFP_TOKEN_ENV, SubmitError, submit_pipeline

REPO = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/unifl:0.1.0"
TOKEN = "kfp-test-token-4711-do-not-print"

Answer = tuple[int, dict[str, str], bytes]


class Recorded:
    """The requests a test server received: (method, path, Authorization header, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None, bytes]] = []


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[str, str, bytes], Answer]], tuple[str, Recorded]]]:
    """Start an HTTP server on 127.0.0.1 that answers with `answer(method, path, body)`."""
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Callable[[str, str, bytes], Answer]) -> tuple[str, Recorded]:
        recorded = Recorded()

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded.requests.append(
                    (self.command, self.path, self.headers.get("Authorization"), body)
                )
                status, headers, data = answer(self.command, self.path, body)
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", recorded

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def params_with_image(image: str | None = IMAGE) -> Params:
    params = load_params(REPO / "params.yaml")
    params.pipeline.image = image
    return params


def json_answer(status: int, payload: object) -> Answer:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


HEALTHY = json_answer(200, {"commit_sha": "abc", "tag_name": "2.5.0", "multi_user": False})


def test_a_refused_connection_names_the_host_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KFP_TOKEN_ENV, raising=False)
    host = f"http://127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    with pytest.raises(SubmitError, match=rf"cannot reach Kubeflow Pipelines at {host}: .*refused"):
        submit_pipeline(params_with_image(), host)
    assert time.perf_counter() - started < 5

    result = CliRunner().invoke(
        app, ["submit", "--host", host, "--image", IMAGE, "--params", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 2
    assert f"error: cannot reach Kubeflow Pipelines at {host}" in result.output
    assert "Traceback" not in result.output and "MaxRetryError" not in result.output


def test_401_without_a_token_says_that_kfp_token_is_needed(
    serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KFP_TOKEN_ENV, raising=False)
    host, recorded = serve(lambda *_: json_answer(401, {"error": "Jwt is missing"}))
    started = time.perf_counter()
    with pytest.raises(SubmitError) as raised:
        submit_pipeline(params_with_image(), host)
    assert time.perf_counter() - started < 5
    message = str(raised.value)
    assert f"Kubeflow Pipelines at {host} answered 401" in message
    assert "KFP_TOKEN" in message and "docs/cluster.md" in message
    # One request, no retries, and nothing was uploaded.
    assert [(method, path) for method, path, *_ in recorded.requests] == [
        ("GET", "/apis/v2beta1/healthz")
    ]


def test_a_refused_token_is_named_but_never_printed(
    serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KFP_TOKEN_ENV, TOKEN)
    host, recorded = serve(lambda *_: (403, {"Content-Type": "text/plain"}, b"RBAC: access denied"))
    result = CliRunner().invoke(
        app, ["submit", "--host", host, "--image", IMAGE, "--params", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 2
    assert f"{host} answered 403" in result.output
    assert "token in KFP_TOKEN was refused" in result.output
    assert TOKEN not in result.output
    assert recorded.requests[0][2] == f"Bearer {TOKEN}"


def test_a_login_redirect_or_a_wrong_path_is_named(
    serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KFP_TOKEN_ENV, raising=False)
    login = {"Location": "https://kubeflow.example/dex/auth?client_id=kubeflow&state=xyz"}
    host, _ = serve(lambda *_: (302, login, b""))
    with pytest.raises(SubmitError) as raised:
        submit_pipeline(params_with_image(), host)
    assert "redirected GET /apis/v2beta1/healthz to https://kubeflow.example/dex/auth " in str(
        raised.value
    )
    assert "KFP_TOKEN" in str(raised.value) and "state=xyz" not in str(raised.value)

    host, _ = serve(lambda *_: (404, {}, b"404 page not found"))
    with pytest.raises(SubmitError, match=rf"no Kubeflow Pipelines API at {host}: .* 404"):
        submit_pipeline(params_with_image(), host)
    host, _ = serve(lambda *_: (200, {"Content-Type": "text/html"}, b"<html>dashboard</html>"))
    with pytest.raises(SubmitError, match=r"something other than the Kubeflow Pipelines API"):
        submit_pipeline(params_with_image(), host)
    with pytest.raises(SubmitError, match=r"expected a URL starting with http:// or https://"):
        submit_pipeline(params_with_image(), "kubeflow.example.com/pipeline")


def test_401_after_a_healthy_health_check_is_an_error_not_a_traceback(
    serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some gateways let the health check through and guard the rest of the API."""
    monkeypatch.delenv(KFP_TOKEN_ENV, raising=False)

    def answer(method: str, path: str, body: bytes) -> Answer:
        if path.startswith("/apis/v2beta1/healthz"):
            return HEALTHY
        return json_answer(401, {"error": "Unauthorized", "code": 16})

    host, _ = serve(answer)
    with pytest.raises(SubmitError) as raised:
        submit_pipeline(params_with_image(), host)
    message = str(raised.value)
    assert message.startswith(f"Kubeflow Pipelines at {host}: 401")
    assert "KFP_TOKEN" in message


def test_no_image_is_refused_before_anything_is_sent(
    serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KFP_TOKEN_ENV, raising=False)
    host, recorded = serve(lambda *_: HEALTHY)
    with pytest.raises(SubmitError, match=r"--image NAME:TAG .* or set pipeline\.image"):
        submit_pipeline(params_with_image(None), host)
    result = CliRunner().invoke(
        app, ["submit", "--host", host, "--params", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 2
    assert "--image" in result.output and "pipeline.image" in result.output
    assert recorded.requests == []


class KfpStandIn:
    """Answers the v2beta1 endpoints `kfp.Client` calls to upload a pipeline and start a run
    (a stand-in: no Kubeflow Pipelines server can run here)."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def __call__(self, method: str, path: str, body: bytes) -> Answer:
        route = path.split("?")[0]
        if route == "/apis/v2beta1/healthz":
            return HEALTHY
        if (method, route) == ("GET", "/apis/v2beta1/pipelines"):
            return json_answer(200, {})
        if (method, route) == ("POST", "/apis/v2beta1/pipelines/upload"):
            return json_answer(200, {"pipeline_id": "p-1", "display_name": "unifl-full"})
        if (method, route) == ("GET", "/apis/v2beta1/pipelines/p-1/versions"):
            return json_answer(200, {"pipeline_versions": [{"pipeline_version_id": "v-1"}]})
        if (method, route) == ("GET", "/apis/v2beta1/experiments"):
            return json_answer(200, {})
        if (method, route) == ("POST", "/apis/v2beta1/experiments"):
            return json_answer(200, {"experiment_id": "e-1", "display_name": "unifl"})
        if (method, route) == ("POST", "/apis/v2beta1/runs"):
            self.runs.append(json.loads(body))
            return json_answer(200, {"run_id": f"r-{len(self.runs)}"})
        return json_answer(404, {"error": f"no route {method} {route}"})


def test_the_run_uses_the_unifl_pipeline_service_account(
    serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KFP_TOKEN_ENV, raising=False)
    kfp = KfpStandIn()
    host, _ = serve(kfp)
    base = ["submit", "--host", host, "--image", IMAGE, "--params", str(REPO / "params.yaml")]
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    assert f"started run r-1: {host}/#/runs/details/r-1" in result.output
    assert kfp.runs[0]["service_account"] == "unifl-pipeline"
    assert kfp.runs[0]["pipeline_version_reference"] == {
        "pipeline_id": "p-1",
        "pipeline_version_id": "v-1",
    }

    result = CliRunner().invoke(app, [*base, "--service-account", "team-runner"])
    assert result.exit_code == 0, result.output
    assert kfp.runs[1]["service_account"] == "team-runner"
