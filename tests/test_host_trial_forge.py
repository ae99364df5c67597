"""End-to-end trial inside a real Stable Diffusion WebUI Forge (opt-in; skipped without one).

Set ``LORA_TRAINER_FORGE_DIR`` to a checkout of lllyasviel/stable-diffusion-webui-forge (main)
whose ``venv/bin/python`` (or ``LORA_TRAINER_FORGE_PYTHON``) has its requirements_versions.txt and
whose ``repositories/`` are present (huggingface_guess, BLIP, stable-diffusion-webui-assets: the
WebUI's first start clones them), e.g.::

    LORA_TRAINER_FORGE_DIR=/opt/forge pytest tests/test_host_trial_forge.py -v

The checkout is never changed: everything the run writes (config, models, extensions, outputs,
Hugging Face cache) goes into a temporary ``--data-dir``, whose ``extensions/lora_trainer`` links
to this repository's files. The host runs on CPU (``--always-cpu``), headless, with the full UI and
``--api`` on a free 127.0.0.1 port, and ``--skip-prepare-environment`` (no network: install.py is
run on its own, as the host runs it).

The model is a small SD1.5-shaped checkpoint built here. Forge recognises a checkpoint by its UNet
(huggingface_guess: SD1.5 needs ``model_channels`` 320 and a 768-wide context) and builds the text
encoder and the VAE from the configs it ships (backend/huggingface/runwayml/stable-diffusion-v1-5),
so those two are full-size (randomly initialised, from the checkout's own configs and tokenizer)
and only the UNet is small (widths 320, two levels, two res blocks per level).

Checked: install.py changes nothing in the host's environment; the tab (gradio 4), the settings and
the routes load; a txt2img before training; a 2-epoch training through ``/lora_trainer/v1/train``
with the grid after it, polled through ``/status`` (which must not say "not running" before the job
has ended); both files in ``/sdapi/v1/loras`` with SD1 metadata and distinct aliases; Forge's LoRA
loader applies every key of the file (its "[LORA] Loaded ... (skipped 0 keys)" lines, UNet and
CLIP, and no "unmatched keys" / "mismatch"); ``<lora:name:1>`` changes the image and the same
request without it is bit-identical to the one before training; the same after ``/stop``,
``/stop_and_save`` and the host's Interrupt; at the end ``/sdapi/v1/progress`` is idle, Clip skip is
as it was, the log has no traceback. With ``grid_each_epoch`` the columns are made through Forge's
txt2img in the middle of the run, and the LoRA trained is bit-identical to the one trained without.

Then the same Forge is switched to a small SDXL checkpoint (SDXL's detection needs SDXL's UNet
depths, 2048-wide context and 2816-wide ``y``; widths stay 320; CLIP-L, CLIP-G and the VAE are
full-size: a 2.3 GB file), and training, the files (kohya SDXL keys: SGM UNet names, te1/te2, all
applied by Forge), generation with and without the LoRA, /stop_and_save and the idle host are
checked again. ``LORA_TRAINER_FORGE_SDXL=0`` leaves the SDXL part out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from host_trial_common import (
    TXT2IMG,
    Trial,
    add_prepare_tools_probe,
    check_growing_grid,
    check_idle_at_the_end,
    check_install_py_changes_nothing,
    check_prepare_tools,
    check_stopping,
    check_tab_and_routes,
    check_train_and_generate,
    free_port,
    host_env,
    host_python,
    link_extension,
    save_checkpoint,
    select_checkpoint,
    start_server,
    write_user_config,
)

FORGE_DIR = os.environ.get("LORA_TRAINER_FORGE_DIR", "")
WITH_SDXL = os.environ.get("LORA_TRAINER_FORGE_SDXL", "1") not in ("0", "false", "no", "")
START_TIMEOUT = float(os.environ.get("LORA_TRAINER_FORGE_START_TIMEOUT", "900"))
TRAIN_TIMEOUT = float(os.environ.get("LORA_TRAINER_FORGE_TRAIN_TIMEOUT", "900"))
SD15_REPO = ("backend", "huggingface", "runwayml", "stable-diffusion-v1-5")


def _host_python() -> str:
    return host_python(FORGE_DIR, "LORA_TRAINER_FORGE_PYTHON")


def _skip_reason() -> str | None:
    if not FORGE_DIR:
        return "LORA_TRAINER_FORGE_DIR is not set (no Stable Diffusion WebUI Forge checkout to run this trial in)"
    root = Path(FORGE_DIR)
    if not (root / "launch.py").is_file() or not (root / "modules_forge").is_dir() or not (root / "backend").is_dir():
        return f"LORA_TRAINER_FORGE_DIR={FORGE_DIR} is not a Forge checkout (no launch.py / modules_forge/ / backend/)"
    if not Path(_host_python()).is_file():
        return f"no Python for Forge at {_host_python()} (create {root}/venv or set LORA_TRAINER_FORGE_PYTHON)"
    guess = root / "repositories" / "huggingface_guess" / "huggingface_guess" / "detection.py"
    if not guess.is_file():
        return f"{root}/repositories/ is not set up (no {guess.relative_to(root)}); run Forge once with network first"
    if not root.joinpath(*SD15_REPO, "text_encoder", "config.json").is_file():
        return f"{root} has no {'/'.join(SD15_REPO)} configs (an older Forge?)"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]

# --------------------------------------------------------------------------- the checkpoint

# A diffusers UNet whose LDM twin huggingface_guess calls SD1.5: model_channels 320, context 768,
# convolutional proj_in; everything else (levels, widths, depth) is read from the weights.
UNET_SD15 = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 320],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' SD1 naming: the number of heads (Forge's SD1.5 config: 8)
    "norm_num_groups": 32,
}


def build_sd15_checkpoint(models_dir: Path, forge_root: Path, name: str = "tiny_forge_sd15") -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors`` (LDM layout). Deterministic (seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.model.ldm_names import to_a1111_checkpoint

    repo = forge_root.joinpath(*SD15_REPO)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_SD15)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(repo / "vae")))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(repo / "text_encoder")))
    with torch.no_grad():
        # a freshly initialised final LayerNorm gives hidden states of mean ~0, and the "Original"
        # emphasis divides by that mean; a trained CLIP's mean is far from 0
        te.text_model.final_layer_norm.bias.fill_(1.0)
    state = to_a1111_checkpoint(
        unet.state_dict(), vae.state_dict(), te.state_dict(), dict(unet.config), dict(vae.config)
    )
    # the text encoder as Forge keeps it (fp16), the rest in fp32
    state = {
        k: (v.half() if k.startswith("cond_stage_model.") else v).detach().contiguous().clone()
        for k, v in state.items()
    }
    return save_checkpoint(models_dir, name, state)


SDXL_REPO = ("backend", "huggingface", "stabilityai", "stable-diffusion-xl-base-1.0")

# A diffusers SDXL UNet whose SGM twin huggingface_guess calls SDXL: model_channels 320, linear
# proj_in, transformer depths [0, 0, 2, 2, 10, 10] on the input res blocks, context 2048, y of 2816
# (CLIP-G's 1280 + 6 x 256). The widths stay 320 on every level (SDXL's are 320, 640, 1280).
UNET_SDXL = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 320, 320],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 5, 5],  # heads of 64 channels, as Forge builds it
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}


def build_sdxl_checkpoint(models_dir: Path, forge_root: Path, name: str = "tiny_forge_sdxl") -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors`` in SGM layout, fp16 (2.3 GB: the text encoders
    and the VAE are full-size, from the checkout's SDXL configs). Deterministic (seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.model.sdxl import DiffusersSDXL, to_sgm_checkpoint

    repo = forge_root.joinpath(*SDXL_REPO)
    torch.manual_seed(0)
    parts = DiffusersSDXL(
        unet=UNet2DConditionModel(**UNET_SDXL),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(str(repo / "vae"))),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(str(repo / "text_encoder"))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(repo / "text_encoder_2"))),
        tokenizer=None,
        tokenizer_2=None,
        scheduler_config={},
    )
    state = {k: v.detach().half().contiguous() for k, v in to_sgm_checkpoint(parts).items()}
    del parts
    return save_checkpoint(models_dir, name, state)


# --------------------------------------------------------------------------- the server

# what Forge's LoRA loader (extensions-builtin/sd_forge_lora/networks.py) prints when a file does not fit
FORGE_LORA_BAD = ("LoRA version mismatch", "with unmatched keys", "[LORA] Mismatch", "Traceback")


def _lora_modules(path: Path, prefix: str) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return len({k.split(".", 1)[0] for k in f.keys() if k.startswith(prefix) and k.endswith(".lora_down.weight")})


def check_forge_lora_log(new_log: str, name: str, files: list[Path]) -> None:
    """Forge applied every LoRA module of the final file to the UNet and to CLIP, skipping none."""
    final = files[-1]
    lines = [ln for ln in new_log.splitlines() if "[LORA] Loaded" in ln and final.name in ln]
    unet = [ln for ln in lines if "-UNet with" in ln]
    clip = [ln for ln in lines if "-CLIP with" in ln]
    assert unet and clip, f"Forge did not report loading {final.name} for the UNet and CLIP:\n{new_log[-3000:]}"
    for ln, prefix in ((unet[-1], "lora_unet_"), (clip[-1], "lora_te")):
        m = re.search(r"with (\d+) keys at weight [\d.]+ \(skipped (\d+) keys\)", ln)
        assert m, ln
        loaded, skipped = int(m.group(1)), int(m.group(2))
        assert skipped == 0, ln
        assert loaded == _lora_modules(final, prefix) > 0, f"{ln}: the file has {_lora_modules(final, prefix)} modules"


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    root = Path(FORGE_DIR).resolve()
    data_dir = tmp_path_factory.mktemp("forge_data")
    ckpt = build_sd15_checkpoint(data_dir / "models", root)
    link_extension(data_dir)
    add_prepare_tools_probe(data_dir)
    write_user_config(data_dir, ckpt)
    port = free_port()
    args = [
        _host_python(), "launch.py",
        "--skip-prepare-environment", "--skip-python-version-check", "--skip-version-check",
        "--always-cpu",
        "--api", "--port", str(port),  # no --listen: 127.0.0.1 only
        "--data-dir", str(data_dir), "--ckpt", str(ckpt), "--no-download-sd-model",
    ]  # fmt: skip
    server = start_server(args, root, host_env(data_dir), data_dir, port, START_TIMEOUT)
    trial = Trial(
        server,
        TRAIN_TIMEOUT,
        bad_log=FORGE_LORA_BAD,
        check_lora_log=check_forge_lora_log,
        txt2img={**TXT2IMG, "scheduler": "Automatic"},  # Forge warns when the request names none
    )
    try:
        yield trial
    finally:
        server.stop()
        print(f"\n--- Forge log (last lines) ---\n{server.log_tail(60)}")


# --------------------------------------------------------------------------- the trial


def test_install_py_changes_nothing():
    check_install_py_changes_nothing(_host_python(), Path(FORGE_DIR).resolve())


def test_tab_and_routes_registered(forge):
    check_tab_and_routes(forge.server)


def test_prepare_tools_are_the_hosts(forge):
    check_prepare_tools(forge.server, esrgan=True)


def test_train_through_rest_and_generate(forge, tmp_path_factory):
    check_train_and_generate(forge, tmp_path_factory)
    print(f"\ntimings: txt2img {forge.state['txt2img_s']:.1f} s, training + grid {forge.state['train_s']:.1f} s")


def test_growing_grid_in_the_middle_of_a_run(forge, tmp_path_factory):
    check_growing_grid(forge, tmp_path_factory)


@pytest.mark.parametrize("how", ["stop", "stop_and_save", "interrupt"])
def test_stopping_leaves_the_host_as_it_was(forge, tmp_path_factory, how):
    check_stopping(forge, tmp_path_factory, how)


def test_idle_at_the_end(forge):
    check_idle_at_the_end(forge)


# --------------------------------------------------------------------------- SDXL, in the same Forge


@pytest.fixture(scope="module")
def forge_xl(forge):
    """The same Forge, switched to a small SDXL checkpoint (built here, then selected through the
    options API as the checkpoint list would): training follows the checkpoint Forge has selected."""
    if not WITH_SDXL:
        pytest.skip("LORA_TRAINER_FORGE_SDXL=0: the SDXL part is left out")
    server = forge.server
    ckpt = build_sdxl_checkpoint(server.data_dir / "models", Path(FORGE_DIR).resolve())
    select_checkpoint(server, ckpt.name)
    # SDXL on a CPU is slow (full-size CLIP-G in fp16): 2 images x 1 repeat x 2 epochs
    return Trial(
        server,
        TRAIN_TIMEOUT,
        base_model_version="sdxl_base_v1-0",
        bad_log=FORGE_LORA_BAD,
        check_lora_log=check_forge_lora_log,
        txt2img=dict(forge.txt2img),
        prefix="trial_xl",
        images=2,
        repeats=1,
    )


def test_sdxl_train_through_rest_and_generate(forge_xl, tmp_path_factory):
    """The same checks on SDXL: kohya SDXL keys (SGM UNet names, te1/te2) all applied by Forge."""
    st = check_train_and_generate(forge_xl, tmp_path_factory)
    assert "tiny_forge_sdxl" in st["messages"][0], st["messages"][0]  # trained on the selected checkpoint
    from safetensors import safe_open

    with safe_open(st["files"][-1]["path"], "pt") as f:
        prefixes = {k.split("_", 2)[1] for k in f.keys()}
    assert prefixes == {"unet", "te1", "te2"}, prefixes
    print(
        f"\nSDXL timings: txt2img {forge_xl.state['txt2img_s']:.1f} s, training + grid {forge_xl.state['train_s']:.1f} s"
    )


def test_sdxl_stop_and_save(forge_xl, tmp_path_factory):
    check_stopping(forge_xl, tmp_path_factory, "stop_and_save")


def test_sdxl_idle_at_the_end(forge_xl):
    check_idle_at_the_end(forge_xl)
