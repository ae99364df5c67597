"""Registration with the WebUI: the scripts/ file, the tab, the settings, the REST routes.

Runs on a fake ``modules`` package (see test_host_a1111). The tab tests run under the installed gradio
(CI: 3.41.2 as in A1111 and Forge-1, 4.40.0 as in Forge-2)."""

from __future__ import annotations

import base64
import importlib.util
import sys
import time
from pathlib import Path

import pytest

from lora_trainer.hosts import webui
from lora_trainer.train.state import STATE_FOLDER  # the resume states live beside the LoRA files
from tests.test_host_a1111 import _master_model, cfg, host_env, install_fake_webui  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = {"lora_trainer_pretrained_model", "lora_trainer_model_config_dir", "lora_trainer_output_dir"}


@pytest.fixture
def fresh_webui(monkeypatch):
    """No backend or routes left over from another test."""
    monkeypatch.setattr(webui, "_backend", None)
    monkeypatch.setattr(webui, "_routed_apps", set())


@pytest.fixture
def env(monkeypatch, tmp_path, fresh_webui):
    return install_fake_webui(monkeypatch, tmp_path)


def _load_script():
    spec = importlib.util.spec_from_file_location("lora_trainer_tab_under_test", ROOT / "scripts" / "lora_trainer_tab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_registers_the_three_callbacks(env, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != ROOT])
    _load_script()
    assert env.callbacks.registered == {
        "ui_tabs": [webui.on_ui_tabs],
        "ui_settings": [webui.on_ui_settings],
        "app_started": [webui.on_app_started],
    }
    assert sys.path[-1] == str(ROOT), "the extension root is appended, never in front of the host's modules"
    _load_script()  # a second import (UI reload) does not add the root twice
    assert sys.path.count(str(ROOT)) == 1


def test_only_lora_trainer_is_a_top_level_package():
    """Forge keeps every extension root on sys.path: no module of ours may shadow one of the host's."""
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert packages == {"lora_trainer"}
    assert modules <= {"install"}, "install.py is the WebUI's installer hook, run in a subprocess"
    trap = {"network", "networks", "lora", "lora_logger", "modules", "scripts", "extensions", "lora_patches"}
    assert not (trap & (packages | modules))


def test_settings_section(env):
    webui.on_ui_settings()
    labels = env.shared.opts.data_labels
    assert {k: labels[k].default for k in labels} == {
        "lora_trainer_subfolder": "",
        "lora_trainer_grid_after_training": True,
        "lora_trainer_unload_unused": False,
        "lora_trainer_rest_data_roots": "",
    }
    assert {labels[k].section for k in labels} == {("lora_trainer", "LoRA Trainer")}


def test_detect_host(env, monkeypatch):
    assert webui.detect_host() == "a1111"
    sd_models = type(sys)("modules.sd_models")
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    assert webui.detect_host() == "a1111"
    sd_models.forge_model_reload = lambda: None
    assert webui.detect_host() == "forge"
    monkeypatch.delattr(sd_models, "forge_model_reload")
    monkeypatch.setitem(sys.modules, "modules_forge", type(sys)("modules_forge"))
    assert webui.detect_host() == "forge"


def test_backend_hides_model_and_folder_fields(env):
    from lora_trainer.hosts.a1111 import A1111Host

    backend = webui.make_backend()
    assert isinstance(backend.extra["host"], A1111Host)
    assert {f"lora_trainer_{f}" for f in backend.hidden_fields} == HIDDEN
    lora_dir = env.shared.cmd_opts.lora_dir
    assert backend.defaults().output_dir == lora_dir
    assert "loaded in AUTOMATIC1111" in backend.notes and lora_dir in backend.notes
    env.shared.opts.data["CLIP_stop_at_last_layers"] = 2
    assert backend.defaults().clip_skip == 2, "the form starts from the WebUI's Clip skip"
    assert webui.get_backend() is webui.get_backend(), "one job per process"


def test_missing_forge_adapter_gives_a_clear_message(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "lora_trainer.hosts.forge", None)  # import fails
    backend = webui.make_backend("forge")
    assert backend.host_name == "forge" and "forge.py" in backend.notes
    backend.start(_minimal_cfg())
    status = backend.extra["job"].wait(30)
    assert status.state == "failed" and "Forge adapter" in status.error


def _minimal_cfg():
    from lora_trainer.config import TrainConfig

    return TrainConfig()


# --------------------------------------------------------------------------- the tab (gradio)


def test_tab_is_one_blocks_without_model_or_folder_fields(env):
    gr = pytest.importorskip("gradio")
    tabs = webui.on_ui_tabs()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and title == "LoRA Trainer" and elem_id == "lora_trainer"
    ids = {c.elem_id for c in blocks.lora_trainer_inputs}
    assert "lora_trainer_train_data_dir" in ids and "lora_trainer_output_name" in ids
    assert not ids & HIDDEN
    # a UI reload builds the tab again over the same job
    job = webui.get_backend().extra["job"]
    webui.on_ui_tabs()
    assert webui.get_backend().extra["job"] is job


def test_tab_that_cannot_be_built_says_why(env, monkeypatch):
    gr = pytest.importorskip("gradio")
    import lora_trainer.ui.tab as tab_module

    def broken(backend, **kw):
        raise ImportError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(tab_module, "build_tab", broken)
    (blocks, title, _), = webui.on_ui_tabs()
    assert isinstance(blocks, gr.Blocks) and title == "LoRA Trainer"
    html = " ".join(str(getattr(b, "value", "")) for b in blocks.blocks.values())
    assert "could not be built" in html and "matplotlib" in html


def test_tab_trains_on_the_loaded_model(host_env, cfg, fresh_webui):  # noqa: F811 - fixtures
    pytest.importorskip("gradio")
    (blocks, _, _), = webui.on_ui_tabs()
    values = [getattr(cfg, c.elem_id.removeprefix("lora_trainer_")) for c in blocks.lora_trainer_inputs]
    h = blocks.lora_trainer_handlers
    assert "started" in h["start"](*values)
    status = webui.get_backend().extra["job"].wait(120)
    assert status.state == "done", status.error
    assert sorted(p.name for p in host_env.lora_dir.iterdir() if p.name != STATE_FOLDER) == ["t-000001.safetensors", "t.safetensors"]
    shown = h["refresh"]()  # status, loss plot, files, log, ...
    status_html, files_html = shown[0], shown[2]
    assert 'data-state="done"' in status_html and "&lt;lora:t:1&gt;" in files_html


# --------------------------------------------------------------------------- REST routes


def _client(env, api_auth=None):
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    env.shared.cmd_opts.api_auth = api_auth
    app = fastapi.FastAPI()
    webui.on_app_started(None, app)
    webui.on_app_started(None, app)  # registered once per app
    return TestClient(app), app


def test_routes_are_added_once(env):
    from lora_trainer.api import PREFIX

    client, app = _client(env)
    paths = [r.path for r in app.routes if r.path.startswith(PREFIX)]
    assert sorted(paths) == sorted(f"{PREFIX}/{n}" for n in ("train", "status", "stop", "stop_and_save", "grid"))
    r = client.get(f"{PREFIX}/status")
    assert r.status_code == 200 and r.json()["state"] == "idle"


def test_routes_use_the_hosts_api_auth(env):
    from lora_trainer.api import PREFIX

    client, _ = _client(env, api_auth="u:p")
    assert client.get(f"{PREFIX}/status").status_code == 401
    bad = "Basic " + base64.b64encode(b"u:wrong").decode()
    assert client.get(f"{PREFIX}/status", headers={"Authorization": bad}).status_code == 401
    good = "Basic " + base64.b64encode(b"u:p").decode()
    assert client.get(f"{PREFIX}/status", headers={"Authorization": good}).status_code == 200
    assert client.post(f"{PREFIX}/stop", headers={"Authorization": good}).json()["stopping"] is False


def test_route_keeps_files_in_the_lora_folder(env, demo_data, tmp_path):
    from lora_trainer.api import PREFIX

    client, _ = _client(env)
    r = client.post(f"{PREFIX}/train", json={"train_data_dir": str(demo_data), "output_name": "../x"})
    assert r.status_code == 422 and r.json()["field"] == "output_name"
    # output_dir cannot be chosen by a request; with no checkpoint loaded the job fails with a clear message
    r = client.post(
        f"{PREFIX}/train",
        json={"train_data_dir": str(demo_data), "output_name": "ok", "output_dir": str(tmp_path / "outside")},
    )
    assert r.status_code == 200, r.text
    end = time.time() + 30
    while time.time() < end and client.get(f"{PREFIX}/status").json()["state"] not in ("failed", "done"):
        time.sleep(0.05)
    s = client.get(f"{PREFIX}/status").json()
    assert s["state"] == "failed" and "No checkpoint is loaded" in s["error"]
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(
    "flags,warned",
    [
        ({}, None),
        ({"listen": True}, "--gradio-auth and --api-auth"),
        ({"listen": True, "gradio_auth": "u:p"}, "--api-auth"),
        ({"share": True, "api_auth": "u:p"}, "--gradio-auth"),
        ({"listen": True, "gradio_auth": "u:p", "api_auth": "u:p"}, None),
    ],
)
def test_the_tab_warns_when_the_webui_is_open_to_the_network_without_credentials(env, flags, warned):
    for attr in ("listen", "share", "server_name", "gradio_auth", "api_auth"):
        setattr(env.shared.cmd_opts, attr, flags.get(attr))
    notes = webui.make_backend().notes
    if warned is None:
        assert "Warning" not in notes
    else:
        assert "reachable from other machines" in notes and f"without {warned}:" in notes


def test_rest_requests_train_only_on_folders_the_user_offered(env, demo_data, tmp_path):
    """The tab takes any folder (it is the WebUI user's page); a REST request, from any program, only
    folders under the setting's roots, by default the WebUI's own folder; the same answer whether or not
    the folder exists, and nothing runs."""
    from lora_trainer.api import PREFIX

    client, _ = _client(env)
    outside = tmp_path.parent / "elsewhere"
    answers = []
    for folder in ("/etc", str(outside), str(demo_data / ".." / ".." / "..")):
        r = client.post(f"{PREFIX}/train", json={"train_data_dir": folder, "output_name": "x"})
        assert r.status_code == 422 and r.json()["field"] == "train_data_dir", r.text
        answers.append(r.json()["allowed"])
    assert len(set(answers)) == 1 and client.get(f"{PREFIX}/status").json()["state"] == "idle"
    # the setting names the folders REST may use (read at each request)
    outside.mkdir()
    env.shared.opts.lora_trainer_rest_data_roots = f"{outside}\n"
    r = client.post(f"{PREFIX}/train", json={"train_data_dir": str(demo_data), "output_name": "x"})
    assert r.status_code == 422
    r = client.post(f"{PREFIX}/train", json={"train_data_dir": str(outside), "output_name": "x"})
    assert r.status_code == 200, r.text
