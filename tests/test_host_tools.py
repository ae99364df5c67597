"""The WebUI's upscalers and captioners in dataset preparation (a fake WebUI with the same
attributes: ``shared.sd_upscalers``, ``shared.interrogator``, ``modules.deepbooru.model``, a WD14
tagger extension's ``tagger.utils.interrogators``, the queue lock)."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lora_trainer.errors import LoraTrainerError
from lora_trainer.hosts.host_tools import BUSY, host_captioners, host_upscalers
from lora_trainer.ui.prepare_tab import PrepareActions


class Scaler:
    def __init__(self, log):
        self.log = log

    def upscale(self, img, scale, selected_model=None):
        self.log.append(("upscale", scale, selected_model))
        return img.resize((int(img.width * scale), int(img.height * scale)), Image.NEAREST)


class Interrogator:
    def __init__(self, log, lock):
        self.log, self.lock = log, lock

    def load(self):
        self.log.append("blip load")

    def unload(self):
        self.log.append("blip unload")

    def generate_caption(self, image):
        assert self.lock.locked(), "captioning runs under the queue lock"
        assert image.mode == "RGB"
        return "a photo of a woman with a hat"


class DeepBooru:
    def __init__(self, log):
        self.log = log

    def start(self):
        self.log.append("db start")

    def stop(self):
        self.log.append("db stop")

    def tag_multi(self, image):
        return "1girl, hat, smile"


class WD14:
    def __init__(self, log):
        self.log = log

    def interrogate(self, image):
        return {"general": 0.9}, {"1girl": 0.95, "hat": 0.1, "smile": 0.6}

    def unload(self):
        self.log.append("wd14 unload")


@pytest.fixture
def webui(monkeypatch):
    log: list = []
    lock = threading.Lock()
    modules = types.ModuleType("modules")
    modules.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.sd_upscalers = [
        SimpleNamespace(name="None", scaler=Scaler(log), data_path=None),
        SimpleNamespace(name="R-ESRGAN 4x+", scaler=Scaler(log), data_path="models/RealESRGAN/x4.pth"),
    ]
    shared.interrogator = Interrogator(log, lock)
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = lock
    deepbooru = types.ModuleType("modules.deepbooru")
    deepbooru.model = DeepBooru(log)
    tagger = types.ModuleType("tagger")
    tagger.__path__ = []
    utils = types.ModuleType("tagger.utils")
    utils.interrogators = {"wd14-vit-v2": WD14(log)}
    tagger.utils = utils
    for name, mod in {"modules": modules, "modules.shared": shared, "modules.call_queue": call_queue,
                      "modules.deepbooru": deepbooru, "tagger": tagger, "tagger.utils": utils}.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if name.startswith("modules."):
            setattr(modules, name.split(".", 1)[1], mod)
    return SimpleNamespace(log=log, lock=lock)


def _images(folder: Path, n: int = 3, size: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGBA" if i == 0 else "RGB", (size, size), (200, 30 * i, 40, 255) if i == 0 else (200, 30 * i, 40)).save(p)
        out.append(p)
    return out


def test_host_upscalers_by_name_under_the_queue_lock(webui):
    ups = host_upscalers()
    assert list(ups) == ["R-ESRGAN 4x+"]  # "None" is not an upscaler
    out = ups["R-ESRGAN 4x+"](Image.new("RGB", (10, 10)), 4)
    assert out.size == (40, 40) and webui.log == [("upscale", 4, "models/RealESRGAN/x4.pth")]
    with webui.lock:  # a generation runs
        with pytest.raises(LoraTrainerError, match="busy"):
            ups["R-ESRGAN 4x+"](Image.new("RGB", (10, 10)), 4)


def test_crop_enlarges_small_pictures_with_the_chosen_host_upscaler(webui, tmp_path):
    src = tmp_path / "src"
    _images(src, n=2, size=100)
    act = PrepareActions(upscalers=host_upscalers())
    summary, written = act.crop(str(src), str(tmp_path / "out"), "center", 256, 0.5, "#ffffff", False, "R-ESRGAN 4x+")
    assert len(written) == 2, summary
    assert [e[0] for e in webui.log] == ["upscale", "upscale"]
    for p in written:
        with Image.open(p) as im:
            assert im.size == (256, 256)
    webui.log.clear()
    act.crop(str(src), str(tmp_path / "out2"), "center", 256, 0.5, "#ffffff", False, "Lanczos (built in)")
    assert webui.log == []  # the built-in resampler


def test_captioners_write_captions_and_keep_existing_ones(webui, tmp_path):
    imgs = _images(tmp_path / "set")
    imgs[1].with_suffix(".txt").write_text("my own caption\n", encoding="utf-8")
    caps = host_captioners()
    assert set(caps) == {"BLIP (WebUI interrogator)", "DeepBooru (WebUI)", "WD14 tagger: wd14-vit-v2"}
    act = PrepareActions(captioners=caps)
    msg = act.caption(str(tmp_path / "set"), "BLIP (WebUI interrogator)", ".txt", "ohwx", False)
    assert "2 captions written, 1 existing captions kept" in msg
    assert imgs[0].with_suffix(".txt").read_text(encoding="utf-8") == "ohwx, a photo of a woman with a hat\n"
    assert imgs[1].with_suffix(".txt").read_text(encoding="utf-8") == "my own caption\n"
    assert webui.log == ["blip load", "blip unload"]  # the model loaded once for the batch, then given back
    assert not webui.lock.locked()

    act.caption(str(tmp_path / "set"), "DeepBooru (WebUI)", ".txt", "ohwx", True)
    assert imgs[1].with_suffix(".txt").read_text(encoding="utf-8") == "ohwx, 1girl, hat, smile\n"
    act.caption(str(tmp_path / "set"), "WD14 tagger: wd14-vit-v2", ".caption", "", False)
    assert imgs[2].with_suffix(".caption").read_text(encoding="utf-8") == "1girl, smile\n"  # below 0.35 left out
    assert webui.log[-1] == "wd14 unload"


def test_captioning_while_the_webui_is_busy_changes_nothing(webui, tmp_path):
    imgs = _images(tmp_path / "set")
    act = PrepareActions(captioners=host_captioners())
    with webui.lock:
        msg = act.caption(str(tmp_path / "set"), "BLIP (WebUI interrogator)", ".txt", "", False)
    assert BUSY in msg
    assert not any(p.with_suffix(".txt").exists() for p in imgs) and "blip load" not in webui.log


def test_a_broken_image_is_listed_and_the_others_are_captioned(webui, tmp_path):
    imgs = _images(tmp_path / "set")
    imgs[2].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    msg = PrepareActions(captioners=host_captioners()).caption(str(tmp_path / "set"), "DeepBooru (WebUI)", ".txt", "", False)
    assert "2 captions written" in msg and "1 images could not be captioned: img2.png" in msg
    assert not imgs[2].with_suffix(".txt").exists()
    assert webui.log == ["db start", "db stop"]


def test_no_captioner_outside_a_webui(tmp_path):
    assert host_captioners() == {} and host_upscalers() == {}
    assert "No captioner chosen" in PrepareActions().caption(str(tmp_path), "", ".txt", "", False)
