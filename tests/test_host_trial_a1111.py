"""End-to-end trial inside a real AUTOMATIC1111 WebUI (opt-in; skipped without one).

Set ``LORA_TRAINER_A1111_DIR`` to an A1111 checkout (v1.10.x) whose ``venv/bin/python`` (or
``LORA_TRAINER_A1111_PYTHON``) has its requirements (``clip`` included) and whose ``repositories/``
are present (the WebUI's first start clones them), e.g.::

    LORA_TRAINER_A1111_DIR=/opt/a1111 pytest tests/test_host_trial_a1111.py -v

The checkout is never changed: everything the run writes (config, models, extensions, outputs,
Hugging Face cache) goes into a temporary ``--data-dir``, whose ``extensions/lora_trainer`` links
to this repository's files. The host runs on CPU (``--use-cpu all --no-half --precision full``),
headless, with the full UI and ``--api`` on a free 127.0.0.1 port, and ``--skip-prepare-environment``
(no network: install.py is run on its own, as the host runs it). The model is a tiny SD1.5-shaped
checkpoint built here (widths of 32: ldm's GroupNorm(32); two res blocks per level, as A1111's LoRA
key conversion assumes) whose ``<checkpoint>.yaml`` points ldm's ``FrozenCLIPEmbedder`` at a local
folder with a tiny CLIP config and tokenizer (no download).

Checked: install.py changes nothing in the host's environment; the tab, the settings and the routes
load; a txt2img before training; a 2-epoch training through ``/lora_trainer/v1/train`` with the grid
after it, polled through ``/status`` (which must not say "not running" before the job has ended);
both files in ``/sdapi/v1/loras`` with SD1 metadata and distinct aliases, every key matched by the
host's Lora extension; ``<lora:name:1>`` changes the image and the same request without it is
bit-identical to the one before training; the same after ``/stop``, ``/stop_and_save`` and the host's
Interrupt; at the end ``/sdapi/v1/progress`` is idle, Clip skip is as it was, the log has no traceback. With
``grid_each_epoch`` the columns are made through the host's txt2img in the middle of the run, and the LoRA
trained is bit-identical to the one trained without. These checks are the ones of host_trial_common, which
the Forge trial runs too; what is A1111's (the checkpoints, the command line, what its Lora extension logs,
the probes) is here.

Then SDXL: a tiny SGM-layout checkpoint with its ``.yaml`` (the SDXL base config, narrow; CLIP-L from a
local folder; OpenCLIP built by sgm by architecture name, a tiny one registered by a test-only
extension's ``preload.py``, no download) is loaded through the checkpoint option; 2 epochs through the
REST routes with the grid; SDXL metadata, SGM UNet names, separate te2 q/k/v keys, every key matched
(a file with a bogus key is the control that the log would say so); a file of te2's q/k/v alone changes
the image (the host folds them into OpenCLIP's fused ``in_proj``); the image without a LoRA is
bit-identical to the one before training; the host is idle afterwards.

Then SD2: a tiny ldm checkpoint with its ``.yaml`` (v-prediction, linear transformer projections, ldm's
``FrozenOpenCLIPEmbedder`` with layer "penultimate" on a second tiny OpenCLIP registered by the same
preload, three blocks of which the host runs two) trains 2 epochs through REST with the text encoder;
SD2 metadata, diffusers-style UNet names and ``lora_te_`` q/k/v keys for the two blocks the host runs,
every key matched, te q/k/v alone change the image, the image without a LoRA is bit-identical, and an
in-host probe compares our conditioning/UNet output with the host's with and without the LoRA.

Last, the host's own ``--medvram`` (the flag set and the model reloaded by ``sd_models.load_model``, so its
``lowvram`` hooks are on the SD2 model; on CPU its moves are no-ops, its hooks and bookkeeping are real):
a run trains every adapter, every forward pre-hook is back in place and order afterwards, the image is
bit-identical; with the ``--lowvram`` flag the run is refused, naming it, and nothing changes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from host_trial_common import (
    Trial,
    add_prepare_tools_probe,
    bad_log_lines,
    check_growing_grid,
    check_idle_at_the_end,
    check_install_py_changes_nothing,
    check_prepare_tools,
    check_stopping,
    check_tab_and_routes,
    check_train_and_generate,
    demo_dataset_once,
    digest,
    free_port,
    host_env,
    host_python,
    link_extension,
    save_checkpoint,
    select_checkpoint,
    start_server,
    train_and_wait,
    wait_until_idle,
    write_user_config,
)

A1111_DIR = os.environ.get("LORA_TRAINER_A1111_DIR", "")
START_TIMEOUT = float(os.environ.get("LORA_TRAINER_A1111_START_TIMEOUT", "900"))
TRAIN_TIMEOUT = float(os.environ.get("LORA_TRAINER_A1111_TRAIN_TIMEOUT", "900"))


def _host_python() -> str:
    return host_python(A1111_DIR, "LORA_TRAINER_A1111_PYTHON")


def _skip_reason() -> str | None:
    if not A1111_DIR:
        return "LORA_TRAINER_A1111_DIR is not set (no AUTOMATIC1111 checkout to run this trial in)"
    root = Path(A1111_DIR)
    if not (root / "launch.py").is_file() or not (root / "modules").is_dir():
        return f"LORA_TRAINER_A1111_DIR={A1111_DIR} is not an AUTOMATIC1111 checkout (no launch.py / modules/)"
    if not Path(_host_python()).is_file():
        return f"no Python for the WebUI at {_host_python()} (create {root}/venv or set LORA_TRAINER_A1111_PYTHON)"
    ldm = root / "repositories" / "stable-diffusion-stability-ai" / "ldm" / "models" / "diffusion" / "ddpm.py"
    if not ldm.is_file():
        return f"{root}/repositories/ is not set up (no {ldm.relative_to(root)}); run the WebUI once with network first"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]

# --------------------------------------------------------------------------- the tiny checkpoint

# diffusers configs whose LDM twins A1111 can build: every GroupNorm has 32 groups, so every
# UNet / VAE width is a multiple of 32.
UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    # 2 as in SD1.5: A1111's Lora extension turns kohya's diffusers-style names into LDM ones
    # assuming 3 input/output blocks per level (networks.convert_diffusers_name_to_compvis)
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,  # diffusers' SD1 naming: the number of heads
    "norm_num_groups": 32,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}
CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

CKPT_YAML = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2 ]
        num_heads: 2
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 1, 1 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {clip_dir}
"""


def build_checkpoint(models_dir: Path, name: str = "tiny_sd15") -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors`` + ``<name>.yaml``, and the CLIP config and
    tokenizer folder the yaml points at. Deterministic (seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_trainer.model.ldm_names import to_a1111_checkpoint
    from lora_trainer.model.tiny import write_tiny_tokenizer

    clip_dir = models_dir / "tiny_clip"
    write_tiny_tokenizer(clip_dir)
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    ids = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    # a config.json transformers 4.30 (A1111's pin) reads: written by hand, not by a newer save_pretrained
    (clip_dir / "config.json").write_text(
        json.dumps({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **CLIP, **ids}, indent=1)
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    te = CLIPTextModel(CLIPTextConfig(**CLIP, **ids))
    with torch.no_grad():
        # a freshly initialised final LayerNorm gives hidden states of mean ~0, and A1111's default
        # "Original" emphasis divides by that mean (NaN images); a trained CLIP's mean is far from 0
        te.text_model.final_layer_norm.bias.fill_(1.0)
    state = to_a1111_checkpoint(
        unet.state_dict(), vae.state_dict(), te.state_dict(), dict(unet.config), dict(vae.config)
    )
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}

    ckpt = save_checkpoint(models_dir, name, state)
    ckpt.with_suffix(".yaml").write_text(CKPT_YAML.format(clip_dir=json.dumps(str(clip_dir))))
    return ckpt


# --------------------------------------------------------------------------- the in-host probes

# What the probe routes of the test-only extension share (each script is a module of its own): the host's
# outputs against ours, as relative max differences, without a LoRA and with one (ours: the file applied by
# our hooks and fused q/k/v path; the host's: the same file loaded by its Lora extension), under the host's
# queue lock.
PROBE_COMMON = """\
import torch

from modules import script_callbacks

PROMPT = "ohwx ring, blue background"


def diff(a, b):
    return [float((p - q).abs().max()) / max(float(q.abs().max()), 1e-12) for p, q in zip(a, b)]


def compare(host, ours, targets, name, out):
    import networks
    from modules import call_queue, devices

    from lora_trainer.network.load import network_from_file

    with call_queue.queue_lock:
        networks.loaded_networks.clear()
        base_host, base_ours = host(), ours()
        out["base"] = diff(base_ours, base_host)
        if name:
            path = networks.available_networks[name].filename
            net, unmatched = network_from_file(path, targets())
            net.to(devices.device)
            net.attach()
            try:
                lora_ours = ours()
            finally:
                net.detach()
            networks.load_networks([name], [1.0], [1.0], [None])
            try:
                lora_host = host()
            finally:
                networks.loaded_networks.clear()
                host()  # the host's patched layers put the clean weights back
            out.update(
                unmatched=unmatched,
                modules=len(net.loras),
                lora=diff(lora_ours, lora_host),
                lora_effect=diff(lora_ours, base_ours),
                after=diff(host(), base_host),
            )
        return out
"""


def _probe_script(route: str, probe: str) -> str:
    """A script of the test-only extension: the shared part, ``probe`` (a ``def probe(name: str = "")``),
    and its route ``/lora_trainer_trial/<route>``."""
    register = f'app.add_api_route("/lora_trainer_trial/{route}", probe, methods=["GET"])'
    return f"{PROBE_COMMON}\n\n{probe}\n\nscript_callbacks.on_app_started(lambda demo, app: {register})\n"


def _helper_extension(models_dir: Path) -> Path:
    """The test-only extension beside ours (``extensions/lora_trainer_trial_helpers``): its preload.py registers
    the tiny OpenCLIP architectures (a .json each) before the host builds a model; its scripts add the probes."""
    ext = models_dir.parent / "extensions" / "lora_trainer_trial_helpers"
    (ext / "scripts").mkdir(parents=True, exist_ok=True)
    (ext / "preload.py").write_text(PRELOAD)
    return ext


def _add_openclip_arch(ext: Path, arch: str, embed_dim: int, text_cfg: dict) -> None:
    # a vision tower too (open_clip builds one; sgm and ldm delete it)
    vision = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16}
    config = {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text_cfg}
    (ext / f"{arch}.json").write_text(json.dumps(config, indent=1))


# --------------------------------------------------------------------------- the tiny SDXL checkpoint

# sgm's FrozenOpenCLIPEmbedder2 builds its open_clip model by name: a tiny text tower is registered
# under this name by a preload.py (run by the host before it loads a model) of a test-only extension
# in the data dir. Its tokenizer is open_clip's own (vocabulary of 49408, shipped with the package).
OPENCLIP_ARCH = "lora-trainer-trial-tiny-text"
OPENCLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}  # mlp_ratio 4
SDXL_CKPT_YAML = """\
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {adm}
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_head_channels: 16
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 2]
        context_dim: {context_dim}
        spatial_transformer_attn_type: softmax-xformers
        legacy: False
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              version: {clip_dir}
              layer: hidden
              layer_idx: -2
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: {arch}
              version: null
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {time_embed}
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {time_embed}
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {time_embed}
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 1, 1]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


# A route of the test-only extension, run inside the host: the SDXL conditioning and UNet output as our
# bundle computes them (with a LoRA file applied by our hooks and fused q/k/v path) against the host's own
# get_learned_conditioning / apply_model (with the same file loaded by its Lora extension).
SDXL_PROBE = _probe_script(
    "sdxl_probe",
    """\
def probe(name: str = ""):
    from modules import devices, prompt_parser, shared

    from lora_trainer.hosts.a1111 import _SDXLConditioning
    from lora_trainer.model.sdxl import SDXLCond
    from lora_trainer.network.targets import UNET_ATTENTION_CONTAINERS, find_targets

    sd = shared.sd_model
    xl = _SDXLConditioning(sd, devices.device)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(devices.device)
    t = torch.tensor([500], device=devices.device)
    tids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    batch = prompt_parser.SdConditioning([PROMPT], width=64, height=64)

    def host():
        with torch.no_grad():
            c = sd.get_learned_conditioning(batch)
            return c["crossattn"].float(), c["vector"].float(), sd.apply_model(x, t, c).float()

    def ours():
        with torch.no_grad():
            c = xl.encode_text([PROMPT])
            c = SDXLCond(c.hidden, c.pooled, tids)
            return c.hidden.float(), xl.vector(c.pooled, tids).float(), xl.predict(x, t, c).float()

    def targets():
        return find_targets(sd.model.diffusion_model, "lora_unet", UNET_ATTENTION_CONTAINERS) + xl.text_encoder_targets()

    return compare(host, ours, targets, name, {})
""",
)


def build_sdxl_checkpoint(models_dir: Path, name: str = "tiny_sdxl") -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors`` (SGM layout, as lora_trainer.model.tiny_sdxl but
    with A1111-buildable widths: GroupNorm(32) everywhere, an OpenCLIP vocabulary) + ``<name>.yaml`` (the
    SDXL base config, tiny, with CLIP-L from a local folder), and the test extension that registers the
    tiny OpenCLIP architecture. Deterministic (seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.model.sdxl import DiffusersSDXL, to_sgm_checkpoint
    from lora_trainer.model.tiny import write_tiny_tokenizer
    from lora_trainer.model.tiny_sdxl import TIME_EMBED, TINY_SDXL_UNET, TINY_TE2

    clip_dir = models_dir / "tiny_clip_sdxl"
    write_tiny_tokenizer(clip_dir)
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (clip_dir / "config.json").write_text(
        json.dumps({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **CLIP, **ids}, indent=1)
    )
    te2_config = {
        **TINY_TE2,
        "hidden_size": OPENCLIP_TEXT["width"],
        "num_attention_heads": OPENCLIP_TEXT["heads"],
        "num_hidden_layers": OPENCLIP_TEXT["layers"],
        "intermediate_size": 4 * OPENCLIP_TEXT["width"],
        "vocab_size": OPENCLIP_TEXT["vocab_size"],
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
    }
    unet_config = {**TINY_SDXL_UNET, "norm_num_groups": 32, "cross_attention_dim": CLIP["hidden_size"] + te2_config["hidden_size"]}
    torch.manual_seed(0)
    parts = DiffusersSDXL(
        unet=UNet2DConditionModel(**unet_config),
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP, **ids)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te2_config)),
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler_config={},
    )
    state = {k: v.detach().contiguous().clone() for k, v in to_sgm_checkpoint(parts).items()}
    ckpt = save_checkpoint(models_dir, name, state)
    ckpt.with_suffix(".yaml").write_text(
        SDXL_CKPT_YAML.format(
            adm=unet_config["projection_class_embeddings_input_dim"],
            context_dim=unet_config["cross_attention_dim"],
            clip_dir=json.dumps(str(clip_dir)),
            arch=OPENCLIP_ARCH,
            time_embed=TIME_EMBED,
        )
    )
    # the tiny OpenCLIP architecture, registered in the host before it builds a model; and the probe route
    ext = _helper_extension(models_dir)
    _add_openclip_arch(ext, OPENCLIP_ARCH, te2_config["projection_dim"], OPENCLIP_TEXT)
    (ext / "scripts" / "lora_trainer_trial_probe.py").write_text(SDXL_PROBE)
    return ckpt


# the helper extension's preload.py: every tiny OpenCLIP architecture (a .json beside it) registered
PRELOAD = """\
import glob
import os


def preload(parser):
    import open_clip

    for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "*.json"))):
        open_clip.add_model_config(path)
"""


# --------------------------------------------------------------------------- the tiny SD2 checkpoint

# ldm's FrozenOpenCLIPEmbedder builds its open_clip model by name too: three blocks, of which the host runs
# two (layer "penultimate"), as SD2 runs 23 of OpenCLIP-H's 24
OPENCLIP_SD2_ARCH = "lora-trainer-trial-tiny-text-sd2"
OPENCLIP_SD2_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3}
SD2_CKPT_YAML = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: False
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2 ]
        num_head_channels: 16
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: {context_dim}
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 1, 1 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        arch: {arch}
        version: null
        freeze: True
        layer: "penultimate"
"""

# A route of the test-only extension, run inside the host: SD2's conditioning and UNet output as our bundle
# computes them (the host's wrapper, the UNet called directly; a LoRA file applied by our hooks and the fused
# q/k/v path) against the host's get_learned_conditioning / apply_model with the file loaded by its Lora extension.
SD2_PROBE = _probe_script(
    "sd2_probe",
    """\
def probe(name: str = ""):
    from modules import devices, shared

    from lora_trainer.hosts.a1111 import _openclip_text_encoder
    from lora_trainer.model.ldm import ldm_unet_lora_targets
    from lora_trainer.network.targets import openclip_text_targets

    sd = shared.sd_model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(devices.device)
    t = torch.tensor([500], device=devices.device)
    oc, layers = _openclip_text_encoder(sd)

    def host():
        with torch.no_grad():
            c = sd.get_learned_conditioning([PROMPT])
            return c.float(), sd.apply_model(x, t, c).float()

    def ours():
        with torch.no_grad():
            c = sd.cond_stage_model([PROMPT])
            return c.float(), sd.model.diffusion_model(x, t, context=c).float()

    def targets():
        return ldm_unet_lora_targets(sd.model.diffusion_model, False) + openclip_text_targets(oc, "lora_te", layers)

    return compare(host, ours, targets, name, {"te_layers": layers, "te_blocks": len(oc.transformer.resblocks)})
""",
)


def build_sd2_checkpoint(models_dir: Path, name: str = "tiny_sd2") -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors`` in A1111's SD2 layout (ldm UNet with linear
    projections, OpenCLIP text tower with fused q/k/v under ``cond_stage_model.model.``) + ``<name>.yaml``
    (v-prediction), the tiny OpenCLIP architecture for the helper extension's preload, and the probe route.
    Deterministic (seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.model.ldm_names import to_a1111_checkpoint
    from lora_trainer.model.sdxl import openclip_from_hf_state_dict

    width = OPENCLIP_SD2_TEXT["width"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET, "cross_attention_dim": width, "attention_head_dim": [2, 4], "use_linear_projection": True})
    vae = AutoencoderKL(**VAE)
    te = CLIPTextModel(  # the OpenCLIP tower as HF names it (gelu, open_clip's BPE ids), all three blocks
        CLIPTextConfig(
            vocab_size=OPENCLIP_SD2_TEXT["vocab_size"],
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=OPENCLIP_SD2_TEXT["layers"],
            num_attention_heads=OPENCLIP_SD2_TEXT["heads"],
            max_position_embeddings=OPENCLIP_SD2_TEXT["context_length"],
            hidden_act="gelu",
            projection_dim=width,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )
    with torch.no_grad():
        te.text_model.final_layer_norm.bias.fill_(1.0)  # "Original" emphasis divides by the mean (see build_checkpoint)
    state = to_a1111_checkpoint(unet.state_dict(), vae.state_dict(), {}, dict(unet.config), dict(vae.config))
    state.update(openclip_from_hf_state_dict({**te.state_dict(), "text_projection.weight": torch.eye(width)}, prefix="cond_stage_model.model."))
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    ckpt = save_checkpoint(models_dir, name, state)
    ckpt.with_suffix(".yaml").write_text(SD2_CKPT_YAML.format(context_dim=width, arch=OPENCLIP_SD2_ARCH))
    ext = _helper_extension(models_dir)
    _add_openclip_arch(ext, OPENCLIP_SD2_ARCH, width, OPENCLIP_SD2_TEXT)
    (ext / "scripts" / "lora_trainer_trial_probe_sd2.py").write_text(SD2_PROBE)
    return ckpt


# A route of the test-only extension: the host's --medvram switched on the way the host does it (the flag,
# then sd_models.load_model, which runs lowvram.apply -> setup_for_low_vram on the fresh model), the --lowvram
# flag set or cleared, and what its offloading looks like (every forward pre-hook, in order; module_in_gpu).
OFFLOAD_PROBE = """\
from modules import script_callbacks


def offload(mode: str = "status"):
    from modules import call_queue, lowvram, sd_models, shared

    with call_queue.queue_lock:
        if mode == "medvram":
            shared.cmd_opts.medvram = True
            sd_models.load_model()
        elif mode in ("lowvram_on", "lowvram_off"):
            shared.cmd_opts.lowvram = mode == "lowvram_on"
        sd = shared.sd_model
        return {
            "lowvram": bool(getattr(sd, "lowvram", False)),
            "module_in_gpu": None if lowvram.module_in_gpu is None else type(lowvram.module_in_gpu).__name__,
            "unet_hooks": [getattr(fn, "__qualname__", "?") for fn in sd.model._forward_pre_hooks.values()],
            "pre_hooks": [[id(fn) for fn in m._forward_pre_hooks.values()] for m in sd.modules()],
            "lowvram_hooks": sum(
                getattr(fn, "__module__", "") == "modules.lowvram" for m in sd.modules() for fn in m._forward_pre_hooks.values()
            ),
        }


script_callbacks.on_app_started(lambda demo, app: app.add_api_route("/lora_trainer_trial/offload", offload, methods=["GET"]))
"""




# --------------------------------------------------------------------------- the server

SDXL_CKPT = "tiny_sdxl"
SD2_CKPT = "tiny_sd2"

# what the host's Lora extension (extensions-builtin/Lora/networks.py) logs when a file does not fit (the
# unmatched keys at DEBUG only: the server runs with --loglevel DEBUG)
A1111_LORA_BAD = ("didn't match keys", "Couldn't find network", "Traceback")
# a file with a key the host cannot place: the control that the log would say "didn't match keys"
BOGUS_KEY_FILE = "trial_bogus_key"


def check_a1111_lora_log(new_log: str, name: str, files: list[Path]) -> None:
    """The Lora extension reported no layer of ``name`` (or of a file named after it) it could not apply."""
    bad = [ln for ln in new_log.splitlines() if f"Network {name}" in ln]
    assert not bad, f"the WebUI's Lora extension said {bad[0]!r}:\n{new_log[-3000:]}"


def a1111_trial(server, **kw) -> Trial:
    return Trial(
        server,
        TRAIN_TIMEOUT,
        bad_log=A1111_LORA_BAD,
        check_lora_log=check_a1111_lora_log,
        log_exempt=(BOGUS_KEY_FILE,),
        **kw,
    )


@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    root = Path(A1111_DIR).resolve()
    data_dir = tmp_path_factory.mktemp("a1111_data")
    ckpt = build_checkpoint(data_dir / "models")
    build_sdxl_checkpoint(data_dir / "models", SDXL_CKPT)  # selected by the SDXL tests at the end
    build_sd2_checkpoint(data_dir / "models", SD2_CKPT)  # and then by the SD2 tests
    (_helper_extension(data_dir / "models") / "scripts" / "lora_trainer_trial_offload.py").write_text(OFFLOAD_PROBE)
    add_prepare_tools_probe(data_dir)
    link_extension(data_dir)
    write_user_config(data_dir, ckpt)
    port = free_port()
    args = [
        _host_python(), "launch.py",
        "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check",
        "--use-cpu", "all", "--no-half", "--precision", "full",
        "--api", "--port", str(port),  # no --listen: 127.0.0.1 only
        "--data-dir", str(data_dir), "--ckpt", str(ckpt), "--no-download-sd-model",
        "--loglevel", "DEBUG",  # the Lora extension reports unmatched LoRA keys at DEBUG only
    ]  # fmt: skip
    server = start_server(args, root, host_env(data_dir), data_dir, port, START_TIMEOUT)
    try:
        yield a1111_trial(server)
    finally:
        server.stop()
        print(f"\n--- WebUI log (last lines) ---\n{server.log_tail(60)}")


def _select(trial: Trial, ckpt: str, what: str) -> None:
    t0 = time.monotonic()
    select_checkpoint(trial.server, f"{ckpt}.safetensors", START_TIMEOUT)
    print(f"\n{what} checkpoint loaded in {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="module")
def a1111_xl(a1111):
    """The same host with the tiny SDXL checkpoint selected through the options API (the host loads it)."""
    _select(a1111, SDXL_CKPT, "SDXL")
    return a1111_trial(
        a1111.server,
        base_model_version="sdxl_base_v1-0",
        # clip_skip 1: the host's SDXL has no Clip skip; te2's q/k/v learn enough to change the image alone
        extra_train={"clip_skip": 1, "text_encoder_lr": 1e-2},
        prefix="trial_xl",
        demo=a1111.demo,
    )


@pytest.fixture(scope="module")
def a1111_sd2(a1111):
    """The same host with the tiny SD2 checkpoint selected (after the SDXL tests)."""
    _select(a1111, SD2_CKPT, "SD2")
    return a1111_trial(
        a1111.server,
        base_model_version="sd_v2_v",
        # clip_skip 2 (the common default): not used for SD2, said so, recorded as 1, the host's option untouched
        extra_train={"text_encoder_lr": 1e-2},
        prefix="trial_sd2",
        demo=a1111.demo,
    )


# --------------------------------------------------------------------------- helpers


def _lora_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _check_te_qkv_alone(trial: Trial, final: Path, tensors: dict, meta: dict, te_prefix: str, tag: str) -> dict:
    """A file of the text encoder's attention alone (out_proj zeroed: the host folds q/k/v into OpenCLIP's
    fused in_proj only when out_proj is there too) changes the image, every key matched; afterwards the image
    without a LoRA is the one before training. Returns the file's tensors."""
    from lora_trainer.network.save import save_lora_file

    server = trial.server
    prompt = trial.txt2img["prompt"]
    before = trial.state["before"]
    qkv = {k: v for k, v in tensors.items() if k.startswith(te_prefix) and "_self_attn_" in k}
    for k in qkv:
        if "_out_proj." in k and k.endswith("lora_up.weight"):
            qkv[k] = qkv[k] * 0
    part = f"{final.stem}_{tag}"
    save_lora_file(final.with_name(f"{part}.safetensors"), qkv, {**meta, "ss_output_name": part})
    server.ok("POST", "/sdapi/v1/refresh-loras")
    log_mark = len(server.log_text())
    alone = trial.image(f"{prompt} <lora:{part}:4>")
    after = trial.image(prompt)
    new_log = server.log_text()[log_mark:]
    bad = bad_log_lines(trial, new_log)
    assert not bad, f"the WebUI said {bad[0]!r}:\n{new_log[-3000:]}"
    check_a1111_lora_log(new_log, final.stem, [])
    assert alone != before, f"{te_prefix} q/k/v did not change the image: the host did not apply them to the fused in_proj"
    assert after == before, f"the image without a LoRA changed after {part} ({digest(before)} -> {digest(after)})"
    return qkv


# --------------------------------------------------------------------------- SD1


def test_install_py_changes_nothing():
    check_install_py_changes_nothing(_host_python(), Path(A1111_DIR).resolve())


def test_tab_and_routes_registered(a1111):
    check_tab_and_routes(a1111.server)
    # A1111's options API lists every option with its default (Forge's only those that were set)
    opts = a1111.server.ok("GET", "/sdapi/v1/options")
    for key in ("lora_trainer_subfolder", "lora_trainer_grid_after_training", "lora_trainer_unload_unused"):
        assert key in opts, f"setting {key} is missing from /sdapi/v1/options"


def test_prepare_tools_are_the_hosts(a1111):
    check_prepare_tools(a1111.server, esrgan=True)


def test_train_through_rest_and_generate(a1111, tmp_path_factory):
    check_train_and_generate(a1111, tmp_path_factory)
    print(f"\ntimings: txt2img {a1111.state['txt2img_s']:.1f} s, training + grid {a1111.state['train_s']:.1f} s")


def test_growing_grid_in_the_middle_of_a_run(a1111, tmp_path_factory):
    check_growing_grid(a1111, tmp_path_factory)


@pytest.mark.parametrize("how", ["stop", "stop_and_save", "interrupt"])
def test_stopping_leaves_the_host_as_it_was(a1111, tmp_path_factory, how):
    check_stopping(a1111, tmp_path_factory, how)


def test_idle_at_the_end(a1111):
    check_idle_at_the_end(a1111)


# --------------------------------------------------------------------------- SDXL


def test_sdxl_train_through_rest_and_generate(a1111_xl, tmp_path_factory):
    """The tiny SDXL (sgm DiffusionEngine: CLIP-L + OpenCLIP with fused q/k/v) loaded through the host's
    checkpoint option; the common checks (2 epochs through /train with the grid, the files in the host's list,
    every key matched, the image with and without the LoRA); SGM UNet names and separate te2 q/k/v keys; te2's
    q/k/v alone change the image (the host folded them into the fused in_proj); a file with a bogus key is
    reported (the control); in the host, our conditioning and UNet output equal the host's, with the LoRA too."""
    from lora_trainer.network.save import save_lora_file

    trial, server = a1111_xl, a1111_xl.server
    st = check_train_and_generate(trial, tmp_path_factory)
    print(f"SDXL timings: txt2img {trial.state['txt2img_s']:.1f} s, training + grid {trial.state['train_s']:.1f} s")
    final = Path(st["files"][-1]["path"])

    tensors, meta = _lora_file(final)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"].startswith("stable-diffusion-xl")
    stems = {k.split(".")[0] for k in tensors}
    te2 = {s for s in stems if s.startswith("lora_te2_")}
    assert len(te2) == 6 * OPENCLIP_TEXT["layers"], sorted(te2)
    for layer in range(OPENCLIP_TEXT["layers"]):
        for part in ("q", "k", "v"):
            up = tensors[f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{part}_proj.lora_up.weight"]
            assert up.shape == (OPENCLIP_TEXT["width"], 4) and up.abs().sum() > 0, f"te2 layer {layer} {part} learned nothing"
    assert sum(s.startswith("lora_te1_") for s in stems) == 6 * CLIP["num_hidden_layers"]
    unet = {s for s in stems if s.startswith("lora_unet_")}
    assert unet and all(s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for s in unet)

    log_mark = len(server.log_text())
    qkv = _check_te_qkv_alone(trial, final, tensors, meta, "lora_te2_", "te2qkv")
    # the control: a key the host cannot place is reported (so the checks for "didn't match keys" can see one)
    bogus = {**qkv, "lora_te2_text_model_encoder_layers_99_self_attn_q_proj.lora_up.weight": qkv[next(iter(qkv))]}
    save_lora_file(final.with_name(f"{BOGUS_KEY_FILE}.safetensors"), bogus, {**meta, "ss_output_name": BOGUS_KEY_FILE})
    server.ok("POST", "/sdapi/v1/refresh-loras")
    trial.image(f"{trial.txt2img['prompt']} <lora:{BOGUS_KEY_FILE}:1>")
    control = [ln for ln in server.log_text()[log_mark:].splitlines() if "didn't match keys" in ln]
    assert len(control) == 1 and BOGUS_KEY_FILE in control[0] and "layers_99" in control[0], control

    # inside the host: our conditioning and UNet output equal the host's, without and with the LoRA
    probe = server.ok("GET", f"/lora_trainer_trial/sdxl_probe?name={final.stem}")
    print("SDXL probe (relative max differences: crossattn, vector, UNet output):", probe)
    assert max(probe["base"]) < 1e-5, probe
    assert probe["unmatched"] == [] and probe["modules"] == len(stems), probe
    assert min(probe["lora_effect"]) > 1e-4, probe  # the LoRA changes all three
    assert max(probe["lora"]) < 1e-4, probe  # the host's merged weights (te2 into in_proj) == our hooks / fused path
    assert max(probe["after"]) == 0, probe


def test_sdxl_idle_at_the_end(a1111_xl):
    check_idle_at_the_end(a1111_xl)


# --------------------------------------------------------------------------- SD2


def test_sd2_train_through_rest_and_generate(a1111_sd2, tmp_path_factory):
    """The tiny SD2 (ldm LatentDiffusion, v-prediction, FrozenOpenCLIPEmbedder penultimate: fused q/k/v)
    loaded through the checkpoint option; the common checks with the text encoder; SD2 metadata (clip_skip 1:
    A1111 ignores Clip skip for SD2), diffusers-style UNet names and ``lora_te_`` q/k/v keys for the two blocks
    the host runs; te q/k/v alone change the image (folded into the fused ``in_proj``); in the host, our
    conditioning and UNet output equal the host's, with the LoRA too."""
    trial, server = a1111_sd2, a1111_sd2.server
    st = check_train_and_generate(trial, tmp_path_factory)
    print(f"SD2 timings: txt2img {trial.state['txt2img_s']:.1f} s, training + grid {trial.state['train_s']:.1f} s")
    assert any("SD2: clip_skip is not used" in m for m in st["messages"]), st["messages"]
    assert not any("cannot take" in m for m in st["messages"]), st["messages"]
    final = Path(st["files"][-1]["path"])

    tensors, meta = _lora_file(final)
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True", meta.get("ss_base_model_version")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["ss_clip_skip"] == "1"
    stems = {k.split(".")[0] for k in tensors}
    te = {s for s in stems if s.startswith("lora_te_")}
    run_layers = OPENCLIP_SD2_TEXT["layers"] - 1
    assert len(te) == 6 * run_layers, sorted(te)
    for layer in range(run_layers):
        for part in ("q", "k", "v", "out"):
            up = tensors[f"lora_te_text_model_encoder_layers_{layer}_self_attn_{part}_proj.lora_up.weight"]
            assert up.shape == (OPENCLIP_SD2_TEXT["width"], 4) and up.abs().sum() > 0, f"te layer {layer} {part} learned nothing"
    unet = {s for s in stems if s.startswith("lora_unet_")}
    assert unet and all(s.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for s in unet)

    _check_te_qkv_alone(trial, final, tensors, meta, "lora_te_", "teqkv")
    assert server.ok("GET", "/sdapi/v1/options").get("CLIP_stop_at_last_layers") == trial.state["clip_skip"]

    probe = server.ok("GET", f"/lora_trainer_trial/sd2_probe?name={final.stem}")
    print("SD2 probe (relative max differences: conditioning, UNet output):", probe)
    assert probe["te_blocks"] == OPENCLIP_SD2_TEXT["layers"] and probe["te_layers"] == run_layers, probe
    assert max(probe["base"]) == 0, probe  # the same host code path
    assert probe["unmatched"] == [] and probe["modules"] == len(stems), probe
    assert min(probe["lora_effect"]) > 1e-4, probe
    assert max(probe["lora"]) < 1e-4, probe  # the host's merged weights (q/k/v folded into in_proj) == our hooks / fused path
    assert max(probe["after"]) == 0, probe


def test_sd2_idle_at_the_end(a1111_sd2):
    check_idle_at_the_end(a1111_sd2)


# --------------------------------------------------------------------------- --medvram / --lowvram (last: it reloads the model)


def test_medvram_in_the_host(a1111_sd2, tmp_path_factory):
    """The host's own --medvram (its lowvram hooks on the SD2 model, on CPU, where its moves are no-ops but
    its bookkeeping is real): a run with the text encoder trains every adapter, and afterwards every forward
    pre-hook is back in its place and order, ``module_in_gpu`` is as before and the image is bit-identical.
    With --lowvram the run is refused, naming the flag, and nothing changes."""
    trial, server = a1111_sd2, a1111_sd2.server
    assert "status" in trial.state, "the SD2 training test did not run"
    status = server.ok("GET", "/lora_trainer_trial/offload?mode=medvram", timeout=START_TIMEOUT)
    assert status["lowvram"] and status["unet_hooks"] and status["unet_hooks"][-1].endswith("send_me_to_gpu"), status
    prompt = trial.txt2img["prompt"]
    before = trial.image(prompt)
    before_status = server.ok("GET", "/lora_trainer_trial/offload")
    cfg = {
        "train_data_dir": str(demo_dataset_once(trial, tmp_path_factory)),
        "output_name": "trial_medvram",
        "resolution": 64,
        "network_dim": 4,
        "max_train_epochs": 1,
        "unet_lr": 1e-2,
        "text_encoder_lr": 1e-2,
        "lr_scheduler": "constant",
        "seed": 1,
        "grid_after_training": False,
    }
    st = train_and_wait(trial, cfg)
    assert st["state"] == "done" and st["step"] == st["total_steps"] == trial.images * trial.repeats, st
    assert any("--medvram" in m for m in st["messages"]), st["messages"]
    tensors, _ = _lora_file(Path(st["files"][-1]["path"]))
    dead = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0]
    assert not dead and any(k.startswith("lora_te_") for k in tensors), dead[:3]
    after_status = server.ok("GET", "/lora_trainer_trial/offload")
    print(
        f"\n--medvram: {before_status['lowvram_hooks']} lowvram hooks, on sd_model.model {before_status['unet_hooks']}, "
        f"module_in_gpu {before_status['module_in_gpu']} -> after training {after_status['lowvram_hooks']} hooks, "
        f"module_in_gpu {after_status['module_in_gpu']}; messages: {st['messages'][:2]}"
    )
    assert after_status == before_status, (before_status["unet_hooks"], after_status["unet_hooks"])
    assert trial.image(prompt) == before, "the image without a LoRA changed after a --medvram training"

    server.ok("GET", "/lora_trainer_trial/offload?mode=lowvram_on")
    try:
        assert server.ok("POST", "/lora_trainer/v1/train", {**cfg, "output_name": "trial_lowvram"}).get("started") is True
        st = wait_until_idle(server, "trial_lowvram", TRAIN_TIMEOUT)
    finally:
        server.ok("GET", "/lora_trainer_trial/offload?mode=lowvram_off")
    assert st["state"] == "failed" and "--lowvram" in (st["error"] or "") and "--medvram" in st["error"], st
    assert not st["files"], st["files"]
    assert server.ok("GET", "/lora_trainer_trial/offload") == before_status
    assert trial.image(prompt) == before
    prog = server.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
    assert prog.get("progress", 0) == 0 and not prog.get("state", {}).get("job"), prog
    bad = bad_log_lines(trial, server.log_text())
    assert not bad, f"the WebUI log has {bad[:5]}"
