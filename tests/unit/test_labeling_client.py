"""Client auth and errors: the token never shows, failures name the URL.

The wrong-token case runs against a small HTTP server on 127.0.0.1 that answers
401 and echoes the Authorization header back (the worst case for leaking);
the integration test repeats it against a real Label Studio.
"""

import http.server
import logging
import pickle
import threading

import pytest

from unifl.config import load_params
from unifl.labeling.client import (
    LabelStudioClient,
    LabelStudioClientError,
    Secret,
    canonical_label_config,
    resolve_token,
)
from unifl.labeling.label_config import build_label_config
from unifl.labeling.server import free_port

TOKEN = "tok-3f9a8c1d2e7b4a6f9c0d"


def test_token_from_env_then_file(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFL_TEST_LS_TOKEN", f"  {TOKEN}\n")
    secret = resolve_token("UNIFL_TEST_LS_TOKEN", tmp_path / "ignored")
    assert secret.reveal() == TOKEN
    assert secret.source == "environment variable UNIFL_TEST_LS_TOKEN"
    monkeypatch.delenv("UNIFL_TEST_LS_TOKEN")
    mounted = tmp_path / "token"
    mounted.write_text(TOKEN + "\n")
    secret = resolve_token("UNIFL_TEST_LS_TOKEN", mounted)
    assert secret.reveal() == TOKEN and secret.source == f"file {mounted}"


def test_missing_token_errors_name_env_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIFL_TEST_LS_TOKEN", raising=False)
    with pytest.raises(
        LabelStudioClientError, match="set environment variable UNIFL_TEST_LS_TOKEN"
    ):
        resolve_token("UNIFL_TEST_LS_TOKEN")
    with pytest.raises(
        LabelStudioClientError, match=f"token file {tmp_path / 'nope'} does not exist"
    ):
        resolve_token("UNIFL_TEST_LS_TOKEN", tmp_path / "nope")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(LabelStudioClientError, match="is empty"):
        resolve_token("UNIFL_TEST_LS_TOKEN", tmp_path / "empty")


def test_secret_never_prints_or_pickles():
    secret = Secret(TOKEN, "environment variable X")
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % (secret,)):  # noqa: UP031
        assert TOKEN not in text
        assert "environment variable X" in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    client = LabelStudioClient("http://127.0.0.1:9", secret)
    assert TOKEN not in repr(client) and TOKEN not in str(client)
    assert TOKEN not in repr(vars(client))


def test_unreachable_server_names_url_not_token(caplog, capsys):
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{free_port()}"
    client = LabelStudioClient(url, Secret(TOKEN, "environment variable X"), timeout=5)
    with pytest.raises(LabelStudioClientError) as info:
        client.whoami()
    message = str(info.value)
    assert f"cannot reach Label Studio at {url}" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    captured = capsys.readouterr()
    assert TOKEN not in message + caplog.text + captured.out + captured.err


class EchoUnauthorized(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = f'{{"detail": "Invalid token: {self.headers.get("Authorization")}"}}'.encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def unauthorized_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoUnauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_refused_token_is_named_by_source_and_scrubbed(unauthorized_server, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    client = LabelStudioClient(unauthorized_server, Secret(TOKEN, "environment variable X"))
    with pytest.raises(LabelStudioClientError) as info:
        client.whoami()
    message = str(info.value)
    assert (
        f"Label Studio at {unauthorized_server} refused the token from environment variable X"
        in message
    )
    assert "HTTP 401" in message
    assert "Invalid token: Token ***" in message  # the server's echo, scrubbed
    captured = capsys.readouterr()
    assert TOKEN not in message + caplog.text + captured.out + captured.err


def test_from_config_needs_url_and_rejects_bad_scheme(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    params = load_params(None)
    with pytest.raises(LabelStudioClientError, match="labeling.url is not set"):
        LabelStudioClient.from_config(params.labeling)
    params = load_params(None, overrides=["labeling.url=localhost:8080"])
    with pytest.raises(LabelStudioClientError, match="must start with http"):
        LabelStudioClient.from_config(params.labeling)


def test_config_comparison_ignores_formatting_only():
    config = build_label_config()
    assert canonical_label_config(config) == canonical_label_config(config.strip() + "\n\n")
    squeezed = "".join(line.strip() for line in config.splitlines())
    assert canonical_label_config(config) == canonical_label_config(squeezed)
    changed = config.replace('hotkey="1"', 'hotkey="0"')
    assert canonical_label_config(config) != canonical_label_config(changed)
