"""The standalone tab in a real browser, used the way a user uses it: fill the dataset folder,
press Start, watch progress move, see the saved epochs with their tags, press Stop and save.
Screenshots go to test-artifacts/ (kept by CI in its log)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, demo_data):
    import gradio

    from lora_trainer.config import TrainConfig
    from lora_trainer.hosts.standalone import BUILTIN_TINY

    cfg = TrainConfig(
        pretrained_model=BUILTIN_TINY,
        output_dir=str(tmp_path / "models" / "Lora"),
        output_name="browser",
        resolution=64,
        network_dim=4,
        network_alpha=4.0,
        max_train_epochs=500,  # long enough that Stop and save comes before the end on any machine
        lr_scheduler="constant",
    )
    cfg_path = tmp_path / "ui.toml"
    cfg.save(cfg_path)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        # the dataset is chosen in the page: its folder is offered at start, as a user would
        [sys.executable, "-m", "lora_trainer", "ui", "--config", str(cfg_path), "--port", str(port), "--data-root", str(tmp_path)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "LORA_TRAINER_TOKEN": "browser-test"},
    )
    url = f"http://127.0.0.1:{port}/?token=browser-test"  # the link the server prints
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the UI server did not start:\n" + (tmp_path / "server.log").read_text())
    if proc.poll() is not None:
        pytest.fail("the UI server exited:\n" + (tmp_path / "server.log").read_text())
    yield url, cfg, demo_data, gradio.__version__
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.press("Tab")  # gradio commits the value on blur/change


def test_user_trains_from_the_standalone_tab(server):
    url, cfg, data, gradio_version = server
    shots = ARTIFACTS / f"browser-gradio{gradio_version}"
    shots.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#lora_trainer_start").wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "1-opened.png"), full_page=True)

        # a folder the page was not started with is refused in the page, naming how to offer it
        _fill(page, "lora_trainer_train_data_dir", "/etc")
        page.locator("#lora_trainer_start").click()
        page.locator("#lora_trainer_message .lora_trainer_error", has_text="--data-root").wait_for(timeout=30_000)
        _fill(page, "lora_trainer_train_data_dir", str(data))
        page.locator("#lora_trainer_start").click()
        status = page.locator("#lora_trainer_status_box")
        # progress moves: the step count rises over time
        page.wait_for_function(
            "() => { const b = document.querySelector('#lora_trainer_status_box');"
            " return b && /step<\\/td><td>([1-9][0-9]*) \\//.test(b.innerHTML); }",
            timeout=120_000,
        )
        import re

        first_step = int(re.search(r"step\s+(\d+) /", status.inner_text()).group(1))
        page.screenshot(path=str(shots / "2-training.png"), full_page=True)
        # the saved epochs appear with their tags
        page.locator("#lora_trainer_files code", has_text="<lora:browser-000001:1>").wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "3-epoch-saved.png"), full_page=True)
        # progress moves: a later refresh shows a higher step count
        page.wait_for_function(
            "(first) => { const b = document.querySelector('#lora_trainer_status_box');"
            " const m = b && /step<\\/td><td>(\\d+) \\//.exec(b.innerHTML); return m && Number(m[1]) > first; }",
            arg=first_step,
            timeout=60_000,
        )

        page.locator("#lora_trainer_stop_save").click()
        page.wait_for_function(
            "() => { const b = document.querySelector('#lora_trainer_status_box');"
            " return b && b.dataset.state === 'stopped'; }",
            timeout=120_000,
        )
        page.locator("#lora_trainer_files code", has_text="<lora:browser:1>").wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "4-stopped-and-saved.png"), full_page=True)
        browser.close()
    # the REST routes are mounted on the same server (after gradio's launch) and report the same job
    status = urllib.request.Request(url.split("?")[0] + "lora_trainer/v1/status", headers={"authorization": "Bearer browser-test"})
    with urllib.request.urlopen(status, timeout=10) as r:
        rest = json.load(r)
    assert rest["state"] == "stopped" and "<lora:browser:1>" in [f["tag"] for f in rest["files"]]
    out = Path(cfg.output_dir)
    assert (out / "browser.safetensors").is_file()
    assert (out / "browser-000001.safetensors").is_file()
    assert not list(out.glob("*.tmp")), "no half-written file is left behind"
