"""REST routes: start, status, stop, stop-and-save; credentials; files stay in the LoRA folder."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from lora_trainer.api import PREFIX, add_routes, parse_credentials  # noqa: E402
from lora_trainer.hosts.standalone import StandaloneHost  # noqa: E402
from lora_trainer.job import TrainingJob  # noqa: E402


def _client(tiny_sd, tiny_config, credentials=None, fixed=None):
    host = StandaloneHost(tiny_sd)
    job = TrainingJob(host.run, grid=host.build_grid)
    app = fastapi.FastAPI()
    add_routes(
        app,
        job.start,
        job.stop,
        job.status,
        defaults=lambda: tiny_config,
        lora_dir=lambda cfg: Path(cfg.output_dir),
        credentials=credentials,
        fixed_fields=fixed,
        start_grid=job.start_grid,
    )
    return TestClient(app), job


def _wait(client, cond, timeout=120, auth=None):
    end = time.time() + timeout
    while time.time() < end:
        s = client.get(f"{PREFIX}/status", headers=auth or {}).json()
        if cond(s):
            return s
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_train_status_and_files(tiny_sd, tiny_config):
    client, job = _client(tiny_sd, tiny_config)
    r = client.post(f"{PREFIX}/train", json={"max_train_epochs": 2, "output_name": "api"})
    assert r.status_code == 200 and r.json()["started"] is True
    busy = client.post(f"{PREFIX}/train", json={})
    assert busy.status_code == 409
    s = _wait(client, lambda s: s["state"] == "done")
    assert s["step"] == s["total_steps"] == 16
    assert [f["tag"] for f in s["files"]] == ["<lora:api-000001:1>", "<lora:api:1>"]


def test_resume_continues_the_run_over_rest(tiny_sd, tiny_config):
    client, job = _client(tiny_sd, tiny_config)
    assert client.post(f"{PREFIX}/train", json={"max_train_epochs": 1, "output_name": "api"}).status_code == 200
    _wait(client, lambda s: s["state"] == "done")
    r = client.post(f"{PREFIX}/train", json={"resume": "/etc/passwd", "output_name": "api"})
    assert r.status_code == 422 and r.json()["field"] == "resume"
    r = client.post(f"{PREFIX}/train", json={"max_train_epochs": 2, "output_name": "api", "resume": True})
    assert r.status_code == 200
    s = _wait(client, lambda s: s["state"] in ("done", "failed"))
    assert s["state"] == "done" and s["step"] == s["total_steps"] == 16  # 8 steps more, from step 8


def test_bad_values_and_names_are_refused(tiny_sd, tiny_config):
    client, job = _client(tiny_sd, tiny_config)
    r = client.post(f"{PREFIX}/train", json={"network_dim": "many"})
    assert r.status_code == 422 and r.json()["field"] == "network_dim"
    for name in ("../outside", "/etc/x", "a/b", ".."):
        r = client.post(f"{PREFIX}/train", json={"output_name": name})
        assert r.status_code == 422, name
        assert r.json()["field"] == "output_name"
    assert client.post(f"{PREFIX}/train", json=[1, 2]).status_code == 400
    assert job.status().state == "idle"


@pytest.mark.parametrize(
    "options, field",
    [
        ({"resolution": 100_000}, "resolution"),
        ({"train_batch_size": 100_000}, "train_batch_size"),
        ({"network_dim": 100_000}, "network_dim"),
        ({"max_train_steps": 10**9}, "max_train_steps"),
        ({"output_name": "n" * 300}, "output_name"),
        ({"output_name": "con"}, "output_name"),
        ({"output_name": "LPT1.txt"}, "output_name"),
        ({"output_name": "lora "}, "output_name"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_oversized_values_and_windows_names_are_refused(tiny_sd, tiny_config, options, field):
    client, job = _client(tiny_sd, tiny_config)
    r = client.post(f"{PREFIX}/train", json=options)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert "Allowed: " in r.json()["error"]
    assert job.status().state == "idle"
    assert not Path(tiny_config.output_dir).exists()


def test_bodies_over_the_limit_are_refused_unread(tiny_sd, tiny_config):
    """A 2 MiB name (a tester's 30 MB one started a run): 413 whether the length is declared or the body
    is streamed without one, on every route that reads a body; nothing starts, nothing is written."""
    from lora_trainer.api import MAX_BODY_BYTES

    client, job = _client(tiny_sd, tiny_config)
    big = '{"output_name": "' + "n" * (2 * MAX_BODY_BYTES) + '"}'
    json_type = {"content-type": "application/json"}
    for path in ("/train", "/grid", "/stop"):
        r = client.post(f"{PREFIX}{path}", content=big, headers=json_type)
        assert r.status_code == 413 and "larger than 1048576 bytes" in r.json()["error"], path

    def chunked():  # no content-length: the limit is applied while reading
        for _ in range(3):
            yield b" " * MAX_BODY_BYTES
        yield b"{}"

    r = client.post(f"{PREFIX}/train", content=chunked(), headers=json_type)
    assert r.status_code == 413
    assert job.status().state == "idle"
    assert not Path(tiny_config.output_dir).exists()
    # just under the limit is read (and then validated as usual)
    padded = '{"output_name": "ok"' + " " * (MAX_BODY_BYTES - 40) + "}"
    r = client.post(f"{PREFIX}/train", content=padded, headers=json_type)
    assert r.status_code == 200, r.text
    job.wait(120)


def test_fixed_fields_cannot_be_overridden(tiny_sd, tiny_config, tmp_path):
    fixed_dir = tmp_path / "webui" / "models" / "Lora"
    client, job = _client(tiny_sd, tiny_config, fixed={"output_dir": str(fixed_dir)})
    r = client.post(f"{PREFIX}/train", json={"output_dir": str(tmp_path / "elsewhere"), "max_train_epochs": 1})
    assert r.status_code == 200
    job.wait(120)
    assert (fixed_dir / "t.safetensors").is_file()
    assert not (tmp_path / "elsewhere").exists()


def test_stop_and_save(tiny_sd, tiny_config):
    client, job = _client(tiny_sd, tiny_config)
    assert client.post(f"{PREFIX}/stop").json()["stopping"] is False
    client.post(f"{PREFIX}/train", json={"max_train_epochs": 40, "output_name": "s"})
    _wait(client, lambda s: s["step"] >= 2)
    assert client.post(f"{PREFIX}/stop_and_save").json() == {"stopping": True, "save": True}
    s = _wait(client, lambda s: s["state"] == "stopped")
    assert any(f["final"] and f["tag"] == "<lora:s:1>" for f in s["files"])


def test_credentials_as_the_host_api(tiny_sd, tiny_config):
    creds = parse_credentials("alice:secret,bob:pw2")
    assert creds == {"alice": "secret", "bob": "pw2"}
    client, _ = _client(tiny_sd, tiny_config, credentials=creds)
    assert client.get(f"{PREFIX}/status").status_code == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
    assert client.get(f"{PREFIX}/status", headers=bad).status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"bob:pw2").decode()}
    r = client.get(f"{PREFIX}/status", headers=good)
    assert r.status_code == 200 and r.json()["state"] == "idle"
    assert client.post(f"{PREFIX}/train", json={}).status_code == 401


def test_grid_of_saved_files_over_rest(tiny_sd, tiny_config):
    from lora_trainer.grid import read_grid_parameters

    client, job = _client(tiny_sd, tiny_config)
    client.post(f"{PREFIX}/train", json={"max_train_epochs": 2, "output_name": "g"})
    _wait(client, lambda s: s["state"] == "done")
    # names outside the LoRA folder, or not LoRA files, are refused before anything runs
    for bad in (["../g.safetensors"], ["/etc/passwd"], ["g-000001.ckpt"]):
        r = client.post(f"{PREFIX}/grid", json={"files": bad})
        assert r.status_code == 422 and r.json()["field"] == "files", bad
    assert client.post(f"{PREFIX}/grid", json={}).status_code == 400
    assert client.post(f"{PREFIX}/grid", json={"files": ["missing.safetensors"]}).status_code == 400
    r = client.post(f"{PREFIX}/grid", json={"files": ["g-000001.safetensors", "g.safetensors"], "grid_weights": "0, 1",
                                            "grid_steps": 2})
    assert r.status_code == 200, r.json()
    s = _wait(client, lambda s: s["state"] == "done" and s["grid"]["path"])
    params = read_grid_parameters(s["grid"]["path"])
    assert [c["epoch"] for c in params["columns"]] == [1, 2] and params["weights"] == [0.0, 1.0]
    assert s["grid"]["done"] == s["grid"]["total"] == 4


def test_web_pages_of_other_sites_cannot_drive_training(tiny_sd, tiny_config, tmp_path):
    """A page the user visits can POST to localhost: with text/plain or a form without the browser asking
    first, with JSON after a preflight. Every route refuses a request whose Origin is another site, and the
    body-taking routes refuse anything but JSON; nothing starts and nothing is written."""
    client, job = _client(tiny_sd, tiny_config)
    evil = {"origin": "https://evil.example"}
    body = '{"output_name": "pwned", "max_train_epochs": 1}'
    for path in ("/train", "/grid", "/stop", "/stop_and_save"):
        r = client.post(f"{PREFIX}{path}", content=body, headers={**evil, "content-type": "text/plain"})
        assert r.status_code == 403 and "another site" in r.json()["detail"], path
    assert client.get(f"{PREFIX}/status", headers=evil).status_code == 403
    assert client.post(f"{PREFIX}/train", json={"output_name": "pwned"}, headers={"origin": "null"}).status_code == 403
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = client.post(f"{PREFIX}/train", content=body, headers={"content-type": ctype})
        assert r.status_code == 415 and "application/json" in r.json()["error"], ctype
        assert client.post(f"{PREFIX}/grid", content='{"files": ["t.safetensors"]}', headers={"content-type": ctype}).status_code == 415
    assert job.status().state == "idle"
    assert not Path(tiny_config.output_dir).exists()
    # the page itself (same origin, as the Host it was served from) and scripts without Origin still work
    own = {"origin": "http://testserver", "content-type": "application/json; charset=utf-8"}
    r = client.post(f"{PREFIX}/train", content='{"max_train_epochs": 1, "output_name": "mine"}', headers=own)
    assert r.status_code == 200, r.text
    job.wait(120)
    assert (Path(tiny_config.output_dir) / "mine.safetensors").is_file()
