"""Only the user drives the standalone page: the guard in front of the Gradio app and the REST routes,
attacked as a web page on another site and as another program on the machine would."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from lora_trainer.ui.guard import COOKIE, Guard, is_loopback  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"


def _client(credentials=None, internal=None) -> TestClient:
    async def page(request):
        return PlainTextResponse("the page")

    app = Starlette(routes=[Route("/", page, methods=["GET", "POST"]), Route("/startup-events", page)])
    return TestClient(Guard(app, TOKEN, credentials=credentials, internal=internal))


def test_nothing_without_the_token():
    client = _client()
    r = client.get("/")
    assert r.status_code == 401 and "?token=" in r.text
    assert client.get("/?token=wrong").status_code == 401
    assert client.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/", headers={"cookie": f"{COOKIE}=wrong"}).status_code == 401
    assert client.post("/", headers={"authorization": "Basic " + base64.b64encode(b"u:p").decode()}).status_code == 401


def test_the_printed_link_sets_a_cookie_for_the_pages_later_requests():
    client = _client()
    r = client.get(f"/?token={TOKEN}")
    assert r.status_code == 200 and r.text == "the page"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/").status_code == 200  # the cookie alone now
    assert _client().get("/", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200  # scripts


def test_another_sites_page_is_refused_even_with_the_cookie():
    client = _client()
    client.get(f"/?token={TOKEN}")
    r = client.post("/", headers={"origin": "https://evil.example", "content-type": "text/plain"})
    assert r.status_code == 403 and "another site" in r.text
    assert client.post("/", headers={"origin": "null"}).status_code == 403
    assert client.post("/", headers={"origin": "http://testserver"}).status_code == 200  # the page itself


def test_basic_credentials_when_given_and_gradios_own_calls():
    creds = {"alice": "pw"}
    internal = {"gradio-queue-token"}
    client = _client(credentials=creds, internal=internal)
    r = client.get("/")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert client.get("/", auth=("alice", "pw")).status_code == 200
    assert client.get("/", auth=("alice", "wrong")).status_code == 401
    assert client.get("/", headers={"authorization": "Bearer gradio-queue-token"}).status_code == 200
    assert _client().get("/", headers={"authorization": "Bearer gradio-queue-token"}).status_code == 401
    assert client.get("/startup-events").status_code == 200  # Gradio starts its queue through it


def test_websockets_without_the_token_are_closed():
    from starlette.websockets import WebSocketDisconnect

    async def ws(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("reached the app")

    client = TestClient(Guard(ws, TOKEN))
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/queue/join") as s:
        s.receive_text()


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.com"))


# ---------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ui(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_trainer", "ui", "--set", "pretrained_model=builtin:tiny-sd15", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
    )


def _request(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_network_address_without_credentials_is_refused_before_serving(tmp_path):
    pytest.importorskip("gradio")
    proc = _ui(tmp_path, "--host", "0.0.0.0", "--port", str(_free_port()))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "--auth" in out and "Traceback" not in out


def test_the_running_server_answers_only_its_user(tmp_path):
    pytest.importorskip("gradio")
    port = _free_port()
    proc = _ui(tmp_path, "--port", str(port))
    try:
        link = None
        deadline = time.time() + 120
        while time.time() < deadline and link is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if "?token=" in line:
                link = line[line.index("http://") :].split()[0]
        assert link, "no link with a token printed"
        base = f"http://127.0.0.1:{port}"
        token = link.split("?token=")[1]
        assert _request(base + "/")[0] == 401
        assert _request(link)[0] == 200  # the page
        train = base + "/lora_trainer/v1/train"
        assert _request(train, {"output_name": "x"})[0] == 401
        assert _request(train, {"output_name": "x"}, {"authorization": "Bearer nope"})[0] == 401
        code, body = _request(train, {"output_name": "x"}, {"authorization": f"Bearer {token}", "origin": "https://evil.example"})
        assert code == 403, body
        code, body = _request(base + "/lora_trainer/v1/status", headers={"authorization": f"Bearer {token}"})
        assert code == 200 and json.loads(body)["state"] == "idle"
        # the client names no folder outside the roots the page was started with (the current folder here)
        me = {"authorization": f"Bearer {token}"}
        answers = {}
        for field, value in (("train_data_dir", "/etc"), ("train_data_dir", "/no/such/dir"), ("pretrained_model", "/etc/shadow"),
                             ("train_data_dir", str(tmp_path / ".." / "outside"))):
            code, body = _request(train, {field: value, "output_name": "x"}, me)
            assert code == 422 and json.loads(body)["field"] == field, body
            answers[value] = json.loads(body)["allowed"]
        assert answers["/etc"] == answers["/no/such/dir"]  # nothing told about what exists
        code, body = _request(base + "/lora_trainer/v1/grid", {"files": ["a.safetensors"], "output_dir": "/"}, me)
        assert code in (400, 422), body  # the LoRA folder is the server's: "/" is ignored, the file is not in it
        assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.png"))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
