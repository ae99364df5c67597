"""The epochs x weights grid on the standalone host with the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lora_trainer.grid import GridSpec, build_grid, cell_at, column_for, default_prompt, label_geometry
from lora_trainer.hosts.standalone import StandaloneGenerator
from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.train.loop import train


@pytest.fixture
def three_epochs(tiny_sd, tiny_config):
    tiny_config.max_train_epochs = 3
    tiny_config.unet_lr = tiny_config.text_encoder_lr = 5e-3
    result = train(tiny_config, make_sd_bundle(tiny_sd))
    assert [p.name for p in result.files] == ["t-000001.safetensors", "t-000002.safetensors", "t.safetensors"]
    return tiny_sd, [str(p) for p in result.files]


def test_grid_cells_labels_and_png_text(three_epochs, tmp_path):
    parts, files = three_epochs
    spec = GridSpec(files=files, weights=[0, 0.5, 1.0], seeds=[7], prompt="ohwx, ring", steps=4,
                    cfg_scale=3.0, width=64, height=64, sampler_name="DDIM")
    assert [c.label for c in spec.columns()] == ["epoch 1", "epoch 2", "epoch 3"]
    progress = []
    result = build_grid(spec, StandaloneGenerator(parts), progress=lambda d, t: progress.append((d, t)),
                        out_path=tmp_path / "grid.png")
    assert progress[-1] == (9, 9)
    imgs = [np.asarray(i) for i in result.images]
    row0, row2 = imgs[0:3], imgs[6:9]
    # weight 0 is the base model: the same image in every column, bit for bit
    assert all(np.array_equal(row0[0], x) for x in row0[1:])
    # different epochs at weight 1 differ, and weight 1 differs from weight 0
    assert not np.array_equal(row2[0], row2[2])
    assert not np.array_equal(row0[2], row2[2])

    # layout: labels above and left, cells where they belong
    top, left, _ = label_geometry(64, 64)
    grid = result.image
    assert grid.size == (left + 3 * 64, top + 3 * 64)
    g = np.asarray(grid)
    assert (g[:top, left:] < 128).any(), "column labels are drawn above the cells"
    assert (g[top:, :left] < 128).any(), "row labels are drawn left of the cells"
    for r in range(3):
        for c in range(3):
            cell = g[top + r * 64 : top + (r + 1) * 64, left + c * 64 : left + (c + 1) * 64]
            assert np.array_equal(cell, imgs[r * 3 + c])
    # clicking a cell gives its tag
    hit = cell_at(result, spec, left + 64 + 5, top + 2 * 64 + 5)
    assert hit.tag() == "<lora:t-000002:1>"
    assert cell_at(result, spec, 2, 2) is None

    # the PNG carries its parameters
    with Image.open(result.path) as png:
        params = json.loads(png.text["lora_trainer_grid"])
        assert params["weights"] == [0, 0.5, 1.0] and params["seeds"] == [7]
        assert [c["label"] for c in params["columns"]] == ["epoch 1", "epoch 2", "epoch 3"]
        assert "Seed: 7" in png.text["parameters"]


def test_default_prompt_from_trigger_and_tags(three_epochs):
    _, files = three_epochs
    prompt = default_prompt(files, trigger="ohwx")
    assert prompt.startswith("ohwx, ") and "ring" in prompt
    assert column_for(__import__("pathlib").Path(files[-1])).label == "epoch 3"


def test_labels_work_with_the_installed_pillow():
    from lora_trainer.grid import draw_grid

    cells = [[Image.new("RGB", (32, 32), (255, 0, 0))] * 2]
    out = draw_grid(cells, ["epoch 1", "epoch 2"], ["w 0.8"], title="t")
    assert out.size[0] > 64 and out.size[1] > 32


def test_grid_grows_a_column_per_saved_epoch_while_training(tiny_sd, tiny_config):
    """grid_each_epoch: after each saved epoch the grid so far is saved with that epoch's column;
    the cells are made from the saved files with the training LoRA switched off, so they equal a
    grid built from the same files after training."""
    from lora_trainer.grid import cell_origin, read_grid_parameters
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.train.events import EventBus, GridSaved, StopControl

    cfg = tiny_config.with_overrides(
        ["grid_each_epoch=true", "grid_after_training=true", "grid_weights=0, 1", "grid_steps=3", "unet_lr=5e-3"]
    )
    seen = []

    def listener(ev):
        if isinstance(ev, GridSaved):
            params = read_grid_parameters(ev.path)
            with Image.open(ev.path) as im:
                seen.append(([c["label"] for c in params["columns"]], np.asarray(im.convert("RGB")).copy(), params))

    StandaloneHost(tiny_sd).run(cfg, EventBus(listener), StopControl())
    assert [labels for labels, _, _ in seen] == [["epoch 1"], ["epoch 1", "epoch 2"]]
    files = [str(tiny_config.output_dir + "/t-000001.safetensors"), str(tiny_config.output_dir + "/t.safetensors")]
    spec = GridSpec(files=files, weights=[0.0, 1.0], seeds=[cfg.grid_seed], prompt=seen[-1][2]["prompt"], steps=3,
                    cfg_scale=cfg.grid_cfg_scale, width=64, height=64, sampler_name="DDIM")
    after = build_grid(spec, StandaloneGenerator(tiny_sd))
    final, params = seen[-1][1], seen[-1][2]
    for r in range(2):
        for c in range(2):
            x, y = cell_origin(params, r, c)
            assert np.array_equal(final[y : y + 64, x : x + 64], np.asarray(after.images[r * 2 + c])), (r, c)
    # the first snapshot's cells are the same pictures as the final grid's first column
    x1, y1 = cell_origin(seen[0][2], 1, 0)
    x2, y2 = cell_origin(params, 1, 0)
    assert np.array_equal(seen[0][1][y1 : y1 + 64, x1 : x1 + 64], final[y2 : y2 + 64, x2 : x2 + 64])


def test_the_grid_loader_puts_either_name_style_on_the_trained_layers(tiny_sd, tiny_config, tmp_path):
    """The tiny model is not laid out as SD1.5 (one ResBlock per level), so its files name the UNet
    layers by their LDM paths. The grid's loader puts such a file, and the same file with diffusers
    names (kohya's SD1 naming, older files), on the layers it was trained on: the same outputs."""
    import torch
    from safetensors.torch import load_file, save_file

    from lora_trainer.model.ldm_names import unet_ldm_to_diffusers_names
    from lora_trainer.world.sample import lora_weight

    tiny_config.network_type = "LoCon"
    tiny_config.conv_dim, tiny_config.conv_alpha = 3, 1.5
    tiny_config.max_train_epochs = 1
    result = train(tiny_config, make_sd_bundle(tiny_sd))
    network = result.network
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # large enough that a module on a wrong layer (or none) would show
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    ldm_file = tmp_path / "ldm.safetensors"
    save_file(network.kohya_state_dict(torch.float32), str(ldm_file))
    stems = {k.partition(".")[0] for k in load_file(str(ldm_file))}
    assert "lora_unet_output_blocks_2_1_proj_in" in stems and "lora_unet_output_blocks_1_1_conv" in stems
    assert not any(s.startswith("lora_unet_up_blocks_") for s in stems)
    to_diffusers = {
        "lora_unet_" + ldm.replace(".", "_"): "lora_unet_" + d.replace(".", "_")
        for ldm, d in unet_ldm_to_diffusers_names(dict(tiny_sd.unet.config)).items()
    }
    diffusers_file = tmp_path / "diffusers.safetensors"
    save_file({to_diffusers.get(k.partition(".")[0], k.partition(".")[0]) + "." + k.partition(".")[2]: v
               for k, v in load_file(str(ldm_file)).items()}, str(diffusers_file))

    ids = tiny_sd.tokenizer(["ohwx, ring"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])

    def outputs(net):
        with torch.no_grad(), lora_weight(net, 1.0):
            cond = tiny_sd.text_encoder(ids)[0]
            return cond, tiny_sd.unet(x, t, encoder_hidden_states=cond).sample

    base = outputs(None)
    trained = outputs(network)
    assert not torch.allclose(trained[1], base[1], atol=1e-3)
    gen = StandaloneGenerator(tiny_sd)
    for path in (ldm_file, diffusers_file):
        loaded = gen._network(str(path))  # raises on a module that matches no layer
        assert sorted(m.lora_name for m in loaded.loras) == sorted(m.lora_name for m in network.loras)
        got = outputs(loaded)
        torch.testing.assert_close(got[0], trained[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[1], trained[1], rtol=0, atol=1e-6)
