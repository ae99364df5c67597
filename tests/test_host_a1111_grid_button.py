"""The "Build grid" button on the A1111 host: saved files x weights through the host's txt2img, with
generation locked out, and a new grid file each time (fake WebUI of test_host_a1111)."""

from __future__ import annotations

import json
import sys
import threading
import types
from types import SimpleNamespace

import pytest
from PIL import Image
from test_host_a1111 import _master_model, _one_thread, cfg, host_env  # noqa: F401 - fixtures

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")


@pytest.fixture
def txt2img(host_env, monkeypatch):  # noqa: F811 - the imported fixture
    calls = []
    processing = types.ModuleType("modules.processing")

    class P:
        def __init__(self, **kw):
            self.kw = kw

        def close(self):
            pass

    def process_images(p):
        assert host_env.call_queue.queue_lock.locked()
        assert host_env.shared.state.job == "LoRA grid"
        calls.append(p.kw)
        shade = int(255 * float(p.kw["prompt"].rsplit(":", 1)[1].rstrip(">")))
        name = p.kw["prompt"].rsplit("<lora:", 1)[1].split(":")[0]
        return SimpleNamespace(
            images=[Image.new("RGB", (p.kw["width"], p.kw["height"]), (shade, 0, 0))],
            infotexts=[f'{p.kw["prompt"]}\nSteps: {p.kw["steps"]}, Seed: {p.kw["seed"]}, Lora hashes: "{name}: 0123abcd"'],
        )

    processing.StableDiffusionProcessingTxt2Img = P
    processing.process_images = process_images
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    monkeypatch.setattr(sys.modules["modules"], "processing", processing, raising=False)
    return calls


def test_build_grid_of_chosen_files_through_the_hosts_txt2img(host_env, cfg, txt2img):  # noqa: F811
    from lora_trainer.grid import read_grid_parameters
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, GridSaved, StopControl

    host = A1111Host()
    host.run(cfg, EventBus(), StopControl())
    assert txt2img == []  # grid_after_training is off
    first = str(host_env.lora_dir / "t-000001.safetensors")
    saved = []
    cfg = cfg.with_overrides(["grid_weights=0, 1", "grid_prompt=ohwx ring", "grid_seed=5"])
    host.build_grid(cfg, [first], EventBus(lambda e: saved.append(e.path) if isinstance(e, GridSaved) else None), StopControl())
    assert [c["prompt"] for c in txt2img] == ["ohwx ring, <lora:t-000001:0>", "ohwx ring, <lora:t-000001:1>"]
    assert all(c["seed"] == 5 for c in txt2img)
    assert not host_env.call_queue.queue_lock.locked()
    assert saved == [str(host_env.lora_dir / "t_grid.png")]
    assert [c["epoch"] for c in read_grid_parameters(saved[0])["columns"]] == [1]
    # each cell's infotext as the host wrote it, in cell order: the host's LoRA hashes are on record
    with Image.open(saved[0]) as im:
        cells = json.loads(im.text["lora_trainer_cells"])
    assert [c.split("\n")[0] for c in cells] == ["ohwx ring, <lora:t-000001:0>", "ohwx ring, <lora:t-000001:1>"]
    assert all('Lora hashes: "t-000001: 0123abcd"' in c for c in cells)
    # again, with both files: a new grid next to the first
    host.build_grid(cfg, [first, str(host_env.lora_dir / "t.safetensors")], EventBus(
        lambda e: saved.append(e.path) if isinstance(e, GridSaved) else None), StopControl())
    assert saved[1] == str(host_env.lora_dir / "t_grid-2.png") and len(txt2img) == 2 + 4
    assert host_env.shared.state.job != "LoRA grid"  # ended


def test_build_grid_waits_for_the_running_generation_and_can_be_stopped(host_env, cfg, txt2img):  # noqa: F811
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StopControl

    host = A1111Host()
    host.run(cfg, EventBus(), StopControl())
    lock = host_env.call_queue.queue_lock
    assert lock.acquire()  # a generation is running
    stop = StopControl()
    t = threading.Thread(target=host.build_grid, args=(cfg, [str(host_env.lora_dir / "t.safetensors")], EventBus(), stop))
    t.start()
    t.join(0.5)
    assert t.is_alive() and txt2img == []  # waiting for the lock
    stop.stop(False)
    t.join(5)
    assert not t.is_alive() and txt2img == []
    lock.release()


def test_grid_grows_per_epoch_and_the_hosts_lora_never_reaches_training(host_env, cfg, monkeypatch):  # noqa: F811
    """grid_each_epoch on A1111: after each saved epoch its column goes through txt2img, where the
    host merges the prompt's LoRA into the weights (emulated); training then goes on from clean
    weights: the files equal those of a run without the grid."""
    import torch
    from safetensors.torch import load_file
    from test_host_a1111 import FakeNetwork

    from lora_trainer.grid import read_grid_parameters
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, GridSaved, StopControl

    sd = host_env.sd
    prompts = []
    processing = types.ModuleType("modules.processing")

    class P:
        def __init__(self, **kw):
            self.kw = kw

        def close(self):
            pass

    def process_images(p):
        prompts.append(p.kw["prompt"])
        if not p.kw["prompt"].endswith(":0>"):
            # the host applies the prompt's LoRA: merged into the weights by the next forward
            host_env.networks.loaded_networks[:] = [FakeNetwork(p.kw["prompt"])]
            with torch.no_grad():
                cond = sd.cond_stage_model([p.kw["prompt"]])
                sd.model.diffusion_model(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), context=cond)
        return SimpleNamespace(images=[Image.new("RGB", (p.kw["width"], p.kw["height"]), (len(prompts) * 20, 0, 0))])

    processing.StableDiffusionProcessingTxt2Img = P
    processing.process_images = process_images
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    monkeypatch.setattr(sys.modules["modules"], "processing", processing, raising=False)

    host = A1111Host()
    plain = cfg.with_overrides(["output_name=plain"])
    host.run(plain, EventBus(), StopControl())
    assert prompts == []
    grids = []
    grown = cfg.with_overrides(["grid_each_epoch=true", "grid_after_training=true", "grid_weights=0, 1", "grid_prompt=ohwx"])
    host.run(grown, EventBus(lambda e: grids.append(
        [c["epoch"] for c in read_grid_parameters(e.path)["columns"]]) if isinstance(e, GridSaved) else None), StopControl())
    assert grids == [[1], [1, 2]]  # a column per epoch, no second grid at the end
    assert prompts == ["ohwx, <lora:t-000001:0>", "ohwx, <lora:t-000001:1>", "ohwx, <lora:t:0>", "ohwx, <lora:t:1>"]
    a, b = load_file(host_env.lora_dir / "plain.safetensors"), load_file(host_env.lora_dir / "t.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert host_env.networks.loaded_networks == []
