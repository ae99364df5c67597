"""What the real-host trials (tests/test_host_trial_*.py) share: starting a WebUI headless in a
temporary ``--data-dir`` with the extension linked into it, talking to it over HTTP, and the checks
that are the same on every host (tab and routes, a 2-epoch training through the REST routes, the
files in the host's LoRA list, generation with and without the LoRA, stopping, the host idle at the
end). Host-specific parts (the checkpoint, the command line, what the host's LoRA loader logs) stay
in each trial module.

Not a test module (no ``test_`` prefix); the trials import it as ``host_trial_common``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# the extension as a user's clone has it: without .git and without a virtual environment
EXTENSION_ENTRIES = ("install.py", "scripts", "javascript", "style.css", "lora_trainer", "README.md", "pyproject.toml")


# --------------------------------------------------------------------------- the server


def host_python(root: str, explicit_env: str) -> str:
    """The Python the host runs on: ``$<explicit_env>``, or its checkout's ``venv/bin/python``."""
    return os.environ.get(explicit_env, "") or str(Path(root) / "venv" / "bin" / "python")


def save_checkpoint(models_dir: Path, name: str, state: dict) -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors``, holding ``state``."""
    from safetensors.torch import save_file

    ckpt_dir = models_dir / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"{name}.safetensors"
    save_file(state, str(ckpt))
    return ckpt


def write_user_config(data_dir: Path, ckpt: Path) -> None:
    """``data_dir/config.json``: the checkpoint, and the user settings a headless CPU run needs (no live
    previews: A1111's "Approx NN" preview model is a download; no saved images or grids)."""
    (data_dir / "config.json").write_text(
        json.dumps(
            {"sd_model_checkpoint": ckpt.name, "live_previews_enable": False, "samples_save": False, "grid_save": False}
        )
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_extension(data_dir: Path) -> Path:
    """``data_dir/extensions/lora_trainer``, linked entry by entry to this repository's files: without
    .git (a clone with no 'origin' remote makes A1111 print a traceback) and without a virtual environment."""
    ext = data_dir / "extensions" / "lora_trainer"
    ext.mkdir(parents=True)
    for entry in EXTENSION_ENTRIES:
        if (REPO / entry).exists():
            (ext / entry).symlink_to(REPO / entry)
    return ext


def host_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment a WebUI runs in here: offline, no user cache, no inherited venv or args."""
    env = {
        **os.environ,
        "HF_HOME": str(data_dir / "hf_home"),  # never the user's cache
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "COMMANDLINE_ARGS": "",
        "PYTHONPATH": "",
        **extra,
    }
    env.pop("VIRTUAL_ENV", None)
    return env


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, data_dir: Path):
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.data_dir = data_dir

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 80) -> str:
        """The last lines of the WebUI's output, without its DEBUG lines and progress bars."""
        lines = [ln for ln in self.log_text().splitlines() if " DEBUG [" not in ln and "it/s]" not in ln]
        return "\n".join(lines[-n:]) or "(no log)"

    def request(self, method: str, path: str, body=None, timeout: float = 600.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return status, payload

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, {} if body is None else body, **kw)

    def ok(self, method: str, path: str, body=None, **kw):
        status, payload = self.request(method, path, body, **kw)
        assert status == 200, f"{method} {path} -> {status}: {payload}\n--- WebUI log ---\n{self.log_tail()}"
        return payload

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def start_server(args: Sequence[str], cwd: Path, env: dict, data_dir: Path, port: int, timeout: float) -> Server:
    """Start the WebUI in its own process group (output into ``data_dir/webui.log``) and wait until its
    API answers with a checkpoint selected. Fails the test with the log's tail if it exits or times out."""
    log_path = data_dir / "webui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(args), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(proc, port, log_path, data_dir)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the WebUI exited with {proc.returncode} while starting\n--- WebUI log ---\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"the WebUI did not answer within {timeout:.0f} s\n--- WebUI log ---\n{server.log_tail()}")
            try:
                status, opts = server.get("/sdapi/v1/options", timeout=10)
                if status == 200 and isinstance(opts, dict) and opts.get("sd_model_checkpoint"):
                    status, _ = server.get("/sdapi/v1/sd-models", timeout=10)
                    # the host's API answers before its app_started callbacks (our routes) ran:
                    # wait for ours too, or for the host's "Startup time" line (then the checks report)
                    if status == 200 and (
                        server.get("/lora_trainer/v1/status", timeout=10)[0] == 200
                        or "Startup time:" in server.log_text()
                    ):
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(2)
    except BaseException:
        server.stop()
        raise


def select_checkpoint(server: Server, filename: str, timeout: float = 600.0) -> None:
    """Select a checkpoint through the options API, as the host's checkpoint list does (refreshed first:
    the file may be new), and check that the host took it."""
    server.ok("POST", "/sdapi/v1/refresh-checkpoints")
    titles = [m.get("title", "") for m in server.ok("GET", "/sdapi/v1/sd-models")]
    assert any(t.startswith(filename) for t in titles), f"{filename} is not in the host's checkpoint list: {titles}"
    server.ok("POST", "/sdapi/v1/options", {"sd_model_checkpoint": filename}, timeout=timeout)
    selected = server.ok("GET", "/sdapi/v1/options").get("sd_model_checkpoint", "")
    assert selected.startswith(filename), f"the host did not take {filename}: {selected}\n{server.log_tail()}"


# --------------------------------------------------------------------------- install.py


def check_install_py_changes_nothing(python: str, root: Path) -> None:
    """install.py, run as the host runs it (cwd = WebUI root, its modules importable), installs nothing
    into a WebUI that already has what we need."""
    env = {**os.environ, "PYTHONPATH": str(root), "COMMANDLINE_ARGS": ""}
    env.pop("VIRTUAL_ENV", None)

    def freeze() -> str:
        out = subprocess.run([python, "-m", "pip", "freeze"], cwd=root, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    before = freeze()
    run = subprocess.run(
        [python, str(REPO / "install.py")], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, f"install.py failed:\n{run.stdout}\n{run.stderr}"
    assert freeze() == before, f"install.py changed the WebUI's packages:\n{run.stdout}"


# --------------------------------------------------------------------------- generation

TXT2IMG = {
    "prompt": "ohwx ring, blue background",
    "negative_prompt": "",
    "seed": 1234,
    "steps": 4,
    "cfg_scale": 5.0,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
    "batch_size": 1,
    "n_iter": 1,
    "send_images": True,
    "save_images": False,
}


def txt2img(server: Server, prompt: str, payload: dict | None = None) -> bytes:
    """Decoded RGB pixels of one txt2img (PNG metadata left out of the comparison)."""
    from PIL import Image

    body = {**(payload or TXT2IMG), "prompt": prompt}
    out = server.ok("POST", "/sdapi/v1/txt2img", body)
    images = out.get("images") or []
    assert len(images) == 1, f"txt2img returned {len(images)} images: {str(out)[:500]}"
    img = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[-1]))).convert("RGB")
    assert img.size == (body["width"], body["height"])
    px = img.tobytes()
    assert len(set(px)) > 1, "txt2img gave a flat image (NaN latents?)"
    return px


def transitions(seen: list) -> list:
    return [x for i, x in enumerate(seen) if i == 0 or seen[i - 1] != x]


def digest(px: bytes) -> str:
    return hashlib.sha256(px).hexdigest()[:16]


# --------------------------------------------------------------------------- the checks


@dataclass
class Trial:
    """One host's trial: its server and what differs between hosts."""

    server: Server
    train_timeout: float
    base_model_version: str = "sd_v1"
    """``ss_base_model_version`` the saved files must carry (as the host's LoRA list reads it)."""
    bad_log: tuple[str, ...] = ("Traceback",)
    """Strings that must not appear in the host's log once a LoRA was used."""
    log_exempt: tuple[str, ...] = ()
    """Log lines with one of these in them are left out of the ``bad_log`` checks (a deliberate control)."""
    check_lora_log: Callable[[str, str, list[Path]], None] | None = None
    """``(new log text, output name, files)``: host-specific checks that the LoRA loaded completely."""
    txt2img: dict = field(default_factory=lambda: dict(TXT2IMG))
    extra_train: dict = field(default_factory=dict)
    """Extra training options (e.g. a resolution the checkpoint needs)."""
    prefix: str = "trial"
    """Output names start with it (files are never overwritten: one prefix per trial on a server)."""
    images: int = 4
    repeats: int = 2
    """The demo dataset: images x repeats steps per epoch (batch 1)."""
    state: dict = field(default_factory=dict)
    demo: dict = field(default_factory=dict)

    @property
    def lora_dir(self) -> Path:
        return self.server.data_dir / "models" / "Lora"

    def image(self, prompt: str) -> bytes:
        return txt2img(self.server, prompt, self.txt2img)


def bad_log_lines(trial: Trial, text: str) -> list[str]:
    """The lines of ``text`` with one of ``trial.bad_log`` in them and none of ``trial.log_exempt``."""
    return [
        ln
        for ln in text.splitlines()
        if any(bad in ln for bad in trial.bad_log) and not any(ok in ln for ok in trial.log_exempt)
    ]


def check_tab_and_routes(server: Server) -> None:
    """The extension loaded: its tab is in the UI, its settings exist, its routes answer."""
    status, config = server.get("/config")
    assert status == 200, f"/config -> {status}"
    text = json.dumps(config)
    assert "LoRA Trainer" in text and "tab_lora_trainer" in text, "the LoRA Trainer tab is not in the UI"
    assert "lora_trainer_error" not in text, "the tab was replaced by its error panel\n" + server.log_tail()
    # settings: their components are in the UI's Settings (elem_id "setting_<key>" in both hosts;
    # Forge's /sdapi/v1/options lists only the options that were set, not the defaults)
    for key in ("lora_trainer_subfolder", "lora_trainer_grid_after_training", "lora_trainer_unload_unused"):
        assert f'"setting_{key}"' in text, f"setting {key} is missing from the UI"
    st = server.ok("GET", "/lora_trainer/v1/status")
    assert st["running"] is False, st
    # a bad option is refused up front, naming it
    status, body = server.post("/lora_trainer/v1/train", {"network_dim": 0})
    assert status == 422 and body.get("field") == "network_dim", (status, body)


def wait_until_idle(server: Server, name: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = server.ok("GET", "/lora_trainer/v1/status")
        if not st["running"]:
            return st
        assert time.monotonic() < deadline, f"{name}: still running {timeout:.0f} s after the stop: {st}"
        time.sleep(0.3)


def two_epoch_config(trial: Trial, data: Path, seed: int, **more) -> dict:
    """The 2-epoch training of the checks, with its grid (weights 0 and 1), then ``more``, then the trial's
    ``extra_train``."""
    return {
        "train_data_dir": str(data),
        "resolution": 64,
        "network_dim": 4,
        "network_alpha": 4,
        "max_train_epochs": 2,
        "unet_lr": 1e-2,
        "text_encoder_lr": 1e-3,
        "lr_scheduler": "constant",
        "seed": seed,
        "clip_skip": 2,  # the host's option is 1: set for the run, put back after it
        "grid_weights": "0, 1",
        "grid_steps": 2,
        **more,
        **trial.extra_train,
    }


def check_train_and_generate(trial: Trial, tmp_path_factory) -> dict:
    """Generate, train 2 epochs (+ grid) through the REST routes, check the files in the host's LoRA
    list, generate with the LoRA (different) and without it (bit-identical to before training).
    Returns the final status."""
    from lora_trainer.demo import make_demo_dataset

    server = trial.server
    name = f"{trial.prefix}_ohwx"
    prompt = trial.txt2img["prompt"]
    trial.state["clip_skip"] = server.ok("GET", "/sdapi/v1/options").get("CLIP_stop_at_last_layers")
    t0 = time.monotonic()
    before = trial.image(prompt)
    trial.state["txt2img_s"] = time.monotonic() - t0
    trial.state["before"] = before

    data = make_demo_dataset(tmp_path_factory.mktemp("demo"), images=trial.images, size=64, repeats=trial.repeats)
    cfg = two_epoch_config(trial, data, seed=1, output_name=name)
    log_mark = len(server.log_text())
    t0 = time.monotonic()
    started = server.ok("POST", "/lora_trainer/v1/train", cfg)
    assert started.get("started") is True, started

    deadline = time.monotonic() + trial.train_timeout
    seen = []  # (state, grid done/total) as polled
    while True:
        st = server.ok("GET", "/lora_trainer/v1/status")
        seen.append((st["state"], st["grid"]["done"], st["grid"]["total"]))
        if not st["running"]:
            break
        assert time.monotonic() < deadline, f"training still running after {trial.train_timeout:.0f} s: {st}"
        time.sleep(0.1)
    trial.state["train_s"] = time.monotonic() - t0
    # a job that says it is no longer running has ended: nothing of it changes any more (checked at
    # the end of this test, so that the checks below still run and report)
    premature = None
    for _ in range(5):
        time.sleep(0.3)
        again = server.ok("GET", "/lora_trainer/v1/status")
        if again["running"] or (again["state"], again["grid"], again["files"]) != (
            st["state"],
            st["grid"],
            st["files"],
        ):
            premature = (
                f"the status said running=false ({st['state']}, grid {st['grid']}) while the job went on: "
                f"then {again['state']}, grid {again['grid']}; states polled: {transitions(seen)}"
            )
            st = wait_until_idle(server, name, trial.train_timeout)
            break
    trial.state["status"] = st
    print(
        "\ntraining status:",
        json.dumps(
            {k: st[k] for k in ("state", "step", "total_steps", "epoch", "loss", "files", "messages", "grid")}, indent=1
        ),
    )
    assert st["error"] in (None, ""), (
        f"training failed: {st['error']}\nmessages: {st['messages']}\n--- WebUI log ---\n{server.log_tail()}"
    )
    assert st["state"] == "done", st
    steps = trial.images * trial.repeats * 2  # 2 epochs
    assert st["step"] == st["total_steps"] == steps and st["epoch"] == 2, st
    grid = st["grid"]
    assert grid["total"] == 4 and grid["done"] == grid["total"], f"grid: {grid}"  # 2 files x weights 0, 1
    assert grid["path"] and Path(grid["path"]).is_file(), f"grid: {grid}"
    files = [Path(f["path"]) for f in st["files"]]
    assert [f.name for f in files] == [f"{name}-000001.safetensors", f"{name}.safetensors"], st["files"]
    for f in files:
        assert f.is_file(), f
        assert f.parent.resolve() == trial.lora_dir.resolve(), f"{f} is not in the WebUI's Lora folder"

    loras = {item["name"]: item for item in server.ok("GET", "/sdapi/v1/loras")}
    for f in files:
        assert f.stem in loras, f"{f.stem} is not in /sdapi/v1/loras: {sorted(loras)}"
        meta = loras[f.stem].get("metadata") or {}
        assert meta.get("ss_base_model_version") == trial.base_model_version, (
            f"{f.name}: {meta.get('ss_base_model_version')}"
        )
    aliases = [loras[f.stem]["alias"] for f in files]
    assert len(set(aliases)) == len(aliases), f"duplicate LoRA aliases: {aliases}"
    check_grid_infotexts(Path(grid["path"]), files)

    with_lora = trial.image(f"{prompt} <lora:{name}:1>")
    new_log = server.log_text()[log_mark:]  # the grid after training loaded the files first
    bad = bad_log_lines(trial, new_log)
    assert not bad, f"the WebUI said {bad[0]!r}:\n{new_log[-3000:]}"
    if trial.check_lora_log is not None:
        trial.check_lora_log(new_log, name, files)
    after = trial.image(prompt)
    assert with_lora != after, "<lora:...:1> did not change the image"
    assert after == before, (
        f"the image without the LoRA changed after training (before {digest(before)}, after {digest(after)}): "
        "the host model was not left as it was"
    )
    assert premature is None, premature
    return st


def demo_dataset_once(trial: Trial, tmp_path_factory) -> Path:
    from lora_trainer.demo import make_demo_dataset

    if "data" not in trial.demo:
        trial.demo["data"] = make_demo_dataset(
            tmp_path_factory.mktemp("demo_stop"), images=trial.images, size=64, repeats=trial.repeats
        )
    return trial.demo["data"]


def start_and_wait_for_steps(trial: Trial, name: str, data: Path, steps: int = 2) -> dict:
    server = trial.server
    cfg = {
        "train_data_dir": str(data),
        "output_name": name,
        "resolution": 64,
        "network_dim": 4,
        "max_train_epochs": 200,  # long: it is stopped early
        "lr_scheduler": "constant",
        "seed": 2,
        **trial.extra_train,
    }
    server.ok("POST", "/lora_trainer/v1/train", cfg)
    deadline = time.monotonic() + trial.train_timeout
    while True:
        st = server.ok("GET", "/lora_trainer/v1/status")
        assert st["running"] or st["state"] == "done", f"{name}: the run ended before it could be stopped: {st}"
        if st["step"] >= steps:
            return st
        assert time.monotonic() < deadline, f"{name}: no step after {trial.train_timeout:.0f} s: {st}"
        time.sleep(0.2)


def check_stopping(trial: Trial, tmp_path_factory, how: str) -> None:
    """/stop discards, /stop_and_save writes the final file, the host's own Interrupt stops the run;
    each time generation is unlocked afterwards and gives the image it gave before training."""
    assert "before" in trial.state, "the training test did not run"
    server = trial.server
    data = demo_dataset_once(trial, tmp_path_factory)
    name = f"{trial.prefix}_{how}"
    start_and_wait_for_steps(trial, name, data)
    if how == "interrupt":
        server.ok("POST", "/sdapi/v1/interrupt")
    else:
        out = server.ok("POST", f"/lora_trainer/v1/{how}")
        assert out["stopping"] is True, out
    st = wait_until_idle(server, name)
    assert st["state"] == "stopped", st
    assert st["error"] in (None, ""), st
    final = trial.lora_dir / f"{name}.safetensors"
    if how == "stop_and_save":
        assert final.is_file(), f"stop_and_save wrote no {final.name}: {st['files']}"
        assert any(f["final"] and Path(f["path"]) == final for f in st["files"]), st["files"]
        listed = {item["name"] for item in server.ok("GET", "/sdapi/v1/loras")}
        assert name in listed, f"{name} is not in /sdapi/v1/loras"
    else:
        assert not final.exists(), f"{how} wrote the final file {final.name}"
    assert st["grid"]["total"] == 0, f"a grid was built after {how}: {st['grid']}"
    after = trial.image(trial.txt2img["prompt"])
    assert after == trial.state["before"], f"after {how}, the image without a LoRA differs from the one before training"


def check_idle_at_the_end(trial: Trial) -> None:
    assert "status" in trial.state, "the training test did not run"
    server = trial.server
    prog = server.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
    job = prog.get("state", {})
    assert prog.get("progress", 0) == 0, prog
    assert not job.get("job"), f"the host still has a job: {job}"
    assert not job.get("interrupted") and not job.get("skipped"), job
    assert server.ok("GET", "/lora_trainer/v1/status")["running"] is False
    opts = server.ok("GET", "/sdapi/v1/options")
    assert opts.get("CLIP_stop_at_last_layers") == trial.state["clip_skip"], (
        "the host's Clip skip option was left changed"
    )
    bad = bad_log_lines(trial, server.log_text())
    assert not bad, f"the WebUI log has {bad[:5]}"


def train_and_wait(trial: Trial, cfg: dict) -> dict:
    """Start a training through /train, wait until it has ended, check it ended without an error."""
    server = trial.server
    started = server.ok("POST", "/lora_trainer/v1/train", cfg)
    assert started.get("started") is True, started
    st = wait_until_idle(server, cfg["output_name"], trial.train_timeout)
    assert st["error"] in (None, ""), (
        f"training failed: {st['error']}\nmessages: {st['messages']}\n--- WebUI log ---\n{server.log_tail()}"
    )
    return st


def check_grid_infotexts(grid_png: Path, files: list[Path]) -> None:
    """The grid's cells were made by the host's txt2img: each cell's infotext (kept in the grid PNG)
    is the host's, with ``Lora hashes`` naming the cell's file and the short hash the host reads from
    the file's ``sshs_model_hash``."""
    from PIL import Image
    from safetensors import safe_open

    with Image.open(grid_png) as im:
        cells = json.loads(im.text.get("lora_trainer_cells", "[]"))
        params = json.loads(im.text["lora_trainer_grid"])
    columns = [Path(c["path"]).stem for c in params["columns"]]
    assert len(cells) == len(columns) * len(params["weights"]) * len(params["seeds"]), (len(cells), params)
    short = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            short[f.stem] = sf.metadata()["sshs_model_hash"][:12]
    for i, text in enumerate(cells):
        name = columns[i % len(columns)]  # (the hosts strip <lora:...> from the prompt they record)
        assert "Lora hashes: " in text and f"{name}: {short[name]}" in text, (
            f"cell {i}: the host's infotext has no Lora hash for {name} ({short[name]}):\n{text}"
        )


def check_growing_grid(trial: Trial, tmp_path_factory) -> None:
    """``grid_each_epoch``: a grid column through the host's txt2img after each saved epoch, in the
    middle of the run. The run ends normally with the full grid, the LoRA it trains is the one the
    same run without the grid trains (the generation left the training's model as it was), and the
    host's image without a LoRA is still the one from before training."""
    from safetensors.torch import load_file

    assert "before" in trial.state, "the training test did not run"
    data = demo_dataset_once(trial, tmp_path_factory)
    base = two_epoch_config(trial, data, seed=3, save_precision="float")
    plain = train_and_wait(trial, {**base, "output_name": f"{trial.prefix}_plain", "grid_after_training": False})
    assert plain["grid"]["total"] == 0, plain["grid"]
    grown = train_and_wait(trial, {**base, "output_name": f"{trial.prefix}_grown", "grid_each_epoch": True})
    steps = trial.images * trial.repeats * 2
    assert grown["state"] == "done" and grown["step"] == grown["total_steps"] == steps, grown
    assert not [m for m in grown["messages"] if "could not be" in m], grown["messages"]
    grid = grown["grid"]
    assert grid["total"] == 4 and grid["done"] == 4, f"grid: {grid}"  # the second column: 2 epochs x 2 weights
    assert grid["path"] and Path(grid["path"]).name == f"{trial.prefix}_grown_grid.png", grid
    assert Path(grid["path"]).is_file(), grid
    a = load_file(str(trial.lora_dir / f"{trial.prefix}_plain.safetensors"))
    b = load_file(str(trial.lora_dir / f"{trial.prefix}_grown.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst == 0.0, f"the grid columns changed the training: the LoRA differs by up to {worst:.3g}"
    after = trial.image(trial.txt2img["prompt"])
    assert after == trial.state["before"], "after the growing grid, the image without a LoRA differs"


# A route of the test-only extension: the Prepare tab's tools as the extension finds them in this host (its
# upscalers by name, one used; its captioners by name, none run: BLIP and DeepBooru weights are downloads),
# and an upscale while a generation holds the queue lock (the tool must say the WebUI is busy).
PREP_TOOLS_PROBE = """\
from modules import script_callbacks


def prep_tools():
    from PIL import Image

    from lora_trainer.errors import LoraTrainerError
    from lora_trainer.hosts.host_tools import host_captioners, host_upscalers
    from modules import call_queue

    ups = host_upscalers()
    out = {"upscalers": sorted(ups), "captioners": sorted(host_captioners())}
    small = Image.new("RGB", (32, 24), (200, 40, 40))
    out["lanczos_x2"] = list(ups["Lanczos"](small, 2).size) if "Lanczos" in ups else None
    with call_queue.queue_lock:
        try:
            ups["Lanczos"](small, 2)
            out["busy"] = ""
        except LoraTrainerError as e:
            out["busy"] = str(e)
    return out


script_callbacks.on_app_started(lambda demo, app: app.add_api_route("/lora_trainer_trial/prep_tools", prep_tools, methods=["GET"]))
"""


def add_prepare_tools_probe(data_dir: Path) -> None:
    """A test-only extension in the data dir with the ``prep_tools`` route."""
    scripts = data_dir / "extensions" / "lora_trainer_trial_tools" / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "lora_trainer_trial_prep_tools.py").write_text(PREP_TOOLS_PROBE)


def check_prepare_tools(server: Server, esrgan: bool) -> None:
    """The Prepare tab's upscalers and captioners are the host's own: its upscaler list (without
    "None"), BLIP and DeepBooru; an upscale works, and says the WebUI is busy while a generation runs."""
    tools = server.ok("GET", "/lora_trainer_trial/prep_tools")
    print("host tools:", tools)
    assert "Lanczos" in tools["upscalers"] and "Nearest" in tools["upscalers"] and "None" not in tools["upscalers"]
    if esrgan:
        assert any("ESRGAN" in u for u in tools["upscalers"]), tools  # the user's model upscalers are offered too
    assert tools["captioners"][:2] == ["BLIP (WebUI interrogator)", "DeepBooru (WebUI)"], tools
    assert tools["lanczos_x2"] == [64, 48], tools
    assert "busy" in tools["busy"], tools
