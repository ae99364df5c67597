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
Interrupt; at the end ``/sdapi/v1/progress`` is idle, Clip skip is as it was, the log has no traceback.

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

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
A1111_DIR = os.environ.get("LORA_TRAINER_A1111_DIR", "")
START_TIMEOUT = float(os.environ.get("LORA_TRAINER_A1111_START_TIMEOUT", "900"))
TRAIN_TIMEOUT = float(os.environ.get("LORA_TRAINER_A1111_TRAIN_TIMEOUT", "900"))


def _host_python() -> str:
    explicit = os.environ.get("LORA_TRAINER_A1111_PYTHON", "")
    if explicit:
        return explicit
    return str(Path(A1111_DIR) / "venv" / "bin" / "python")


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
    from safetensors.torch import save_file
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

    ckpt_dir = models_dir / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"{name}.safetensors"
    save_file(state, str(ckpt))
    ckpt.with_suffix(".yaml").write_text(CKPT_YAML.format(clip_dir=json.dumps(str(clip_dir))))
    return ckpt


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
SDXL_PROBE = """\
import torch

from modules import script_callbacks

PROMPT = "ohwx ring, blue background"


def probe(name: str = ""):
    import networks
    from modules import call_queue, devices, prompt_parser, shared

    from lora_trainer.hosts.a1111 import _SDXLConditioning
    from lora_trainer.model.sdxl import SDXLCond
    from lora_trainer.network.load import network_from_file
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

    def diff(a, b):
        return [float((p - q).abs().max()) / max(float(q.abs().max()), 1e-12) for p, q in zip(a, b)]

    with call_queue.queue_lock:
        networks.loaded_networks.clear()
        base_host, base_ours = host(), ours()
        out = {"base": diff(base_ours, base_host)}
        if name:
            path = networks.available_networks[name].filename
            targets = find_targets(sd.model.diffusion_model, "lora_unet", UNET_ATTENTION_CONTAINERS) + xl.text_encoder_targets()
            net, unmatched = network_from_file(path, targets)
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


script_callbacks.on_app_started(lambda demo, app: app.add_api_route("/lora_trainer_trial/sdxl_probe", probe, methods=["GET"]))
"""


def build_sdxl_checkpoint(models_dir: Path, name: str = "tiny_sdxl") -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors`` (SGM layout, as lora_trainer.model.tiny_sdxl but
    with A1111-buildable widths: GroupNorm(32) everywhere, an OpenCLIP vocabulary) + ``<name>.yaml`` (the
    SDXL base config, tiny, with CLIP-L from a local folder), and the test extension that registers the
    tiny OpenCLIP architecture. Deterministic (seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
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
    ckpt_dir = models_dir / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"{name}.safetensors"
    save_file(state, str(ckpt))
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
    ext = models_dir.parent / "extensions" / "lora_trainer_trial_helpers"
    (ext / "scripts").mkdir(parents=True, exist_ok=True)
    (ext / "scripts" / "lora_trainer_trial_probe.py").write_text(SDXL_PROBE)
    config = {
        "embed_dim": te2_config["projection_dim"],
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},  # built, then deleted by sgm
        "text_cfg": OPENCLIP_TEXT,
    }
    (ext / f"{OPENCLIP_ARCH}.json").write_text(json.dumps(config, indent=1))
    (ext / "preload.py").write_text(PRELOAD)
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
SD2_PROBE = """\
import torch

from modules import script_callbacks

PROMPT = "ohwx ring, blue background"


def probe(name: str = ""):
    import networks
    from modules import call_queue, devices, shared

    from lora_trainer.hosts.a1111 import _openclip_text_encoder
    from lora_trainer.model.ldm import ldm_unet_lora_targets
    from lora_trainer.network.load import network_from_file
    from lora_trainer.network.targets import openclip_text_targets

    sd = shared.sd_model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(devices.device)
    t = torch.tensor([500], device=devices.device)

    def host():
        with torch.no_grad():
            c = sd.get_learned_conditioning([PROMPT])
            return c.float(), sd.apply_model(x, t, c).float()

    def ours():
        with torch.no_grad():
            c = sd.cond_stage_model([PROMPT])
            return c.float(), sd.model.diffusion_model(x, t, context=c).float()

    def diff(a, b):
        return [float((p - q).abs().max()) / max(float(q.abs().max()), 1e-12) for p, q in zip(a, b)]

    with call_queue.queue_lock:
        networks.loaded_networks.clear()
        base_host, base_ours = host(), ours()
        oc, layers = _openclip_text_encoder(sd)
        out = {"base": diff(base_ours, base_host), "te_layers": layers, "te_blocks": len(oc.transformer.resblocks)}
        if name:
            path = networks.available_networks[name].filename
            targets = ldm_unet_lora_targets(sd.model.diffusion_model, False) + openclip_text_targets(oc, "lora_te", layers)
            net, unmatched = network_from_file(path, targets)
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


script_callbacks.on_app_started(lambda demo, app: app.add_api_route("/lora_trainer_trial/sd2_probe", probe, methods=["GET"]))
"""


def build_sd2_checkpoint(models_dir: Path, name: str = "tiny_sd2") -> Path:
    """``models_dir/Stable-diffusion/<name>.safetensors`` in A1111's SD2 layout (ldm UNet with linear
    projections, OpenCLIP text tower with fused q/k/v under ``cond_stage_model.model.``) + ``<name>.yaml``
    (v-prediction), the tiny OpenCLIP architecture for the helper extension's preload, and the probe route.
    Deterministic (seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
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
    ckpt_dir = models_dir / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"{name}.safetensors"
    save_file(state, str(ckpt))
    ckpt.with_suffix(".yaml").write_text(SD2_CKPT_YAML.format(context_dim=width, arch=OPENCLIP_SD2_ARCH))
    ext = models_dir.parent / "extensions" / "lora_trainer_trial_helpers"
    (ext / "scripts").mkdir(parents=True, exist_ok=True)
    (ext / "scripts" / "lora_trainer_trial_probe_sd2.py").write_text(SD2_PROBE)
    config = {"embed_dim": width, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16}, "text_cfg": OPENCLIP_SD2_TEXT}
    (ext / f"{OPENCLIP_SD2_ARCH}.json").write_text(json.dumps(config, indent=1))
    (ext / "preload.py").write_text(PRELOAD)
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    root = Path(A1111_DIR).resolve()
    data_dir = tmp_path_factory.mktemp("a1111_data")
    ckpt = build_checkpoint(data_dir / "models")
    state["sdxl_ckpt"] = build_sdxl_checkpoint(data_dir / "models")  # loaded by the SDXL tests at the end
    state["sd2_ckpt"] = build_sd2_checkpoint(data_dir / "models")  # and then by the SD2 tests
    (data_dir / "extensions" / "lora_trainer_trial_helpers" / "scripts" / "lora_trainer_trial_offload.py").write_text(OFFLOAD_PROBE)
    # the extension as a user's clone has it, linked entry by entry: without .git (a clone with no
    # 'origin' remote makes A1111 print a traceback) and without the virtual environment
    ext = data_dir / "extensions" / "lora_trainer"
    ext.mkdir(parents=True)
    for entry in ("install.py", "scripts", "javascript", "style.css", "lora_trainer", "README.md", "pyproject.toml"):
        if (REPO / entry).exists():
            (ext / entry).symlink_to(REPO / entry)
    # user settings a headless CPU run needs: no live previews (their "Approx NN" model is a download)
    (data_dir / "config.json").write_text(
        json.dumps(
            {"sd_model_checkpoint": ckpt.name, "live_previews_enable": False, "samples_save": False, "grid_save": False}
        )
    )

    port = _free_port()
    args = [
        _host_python(), "launch.py",
        "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check",
        "--use-cpu", "all", "--no-half", "--precision", "full",
        "--api", "--port", str(port),  # no --listen: 127.0.0.1 only
        "--data-dir", str(data_dir), "--ckpt", str(ckpt), "--no-download-sd-model",
        "--loglevel", "DEBUG",  # the Lora extension reports unmatched LoRA keys at DEBUG only
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HOME": str(data_dir / "hf_home"),  # never the user's cache
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "COMMANDLINE_ARGS": "",
        "PYTHONPATH": "",
    }
    env.pop("VIRTUAL_ENV", None)
    log_path = data_dir / "webui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, port, log_path, data_dir)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the WebUI exited with {proc.returncode} while starting\n--- WebUI log ---\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the WebUI did not answer within {START_TIMEOUT:.0f} s\n--- WebUI log ---\n{server.log_tail()}"
                )
            try:
                status, opts = server.get("/sdapi/v1/options", timeout=10)
                if status == 200 and isinstance(opts, dict) and opts.get("sd_model_checkpoint"):
                    status, models = server.get("/sdapi/v1/sd-models", timeout=10)
                    if status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(2)
        yield server
    finally:
        server.stop()
        print(f"\n--- WebUI log (last lines) ---\n{server.log_tail(60)}")


# --------------------------------------------------------------------------- helpers

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


def _txt2img(server: Server, prompt: str) -> bytes:
    """Decoded RGB pixels of one txt2img (PNG metadata left out of the comparison)."""
    import io

    from PIL import Image

    out = server.ok("POST", "/sdapi/v1/txt2img", {**TXT2IMG, "prompt": prompt})
    images = out.get("images") or []
    assert len(images) == 1, f"txt2img returned {len(images)} images: {str(out)[:500]}"
    img = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[-1]))).convert("RGB")
    assert img.size == (TXT2IMG["width"], TXT2IMG["height"])
    px = img.tobytes()
    assert len(set(px)) > 1, "txt2img gave a flat image (NaN latents?)"
    return px


def _transitions(seen: list) -> list:
    return [x for i, x in enumerate(seen) if i == 0 or seen[i - 1] != x]


def _digest(px: bytes) -> str:
    return hashlib.sha256(px).hexdigest()[:16]


# --------------------------------------------------------------------------- the trial

state: dict = {}


def test_install_py_changes_nothing():
    """install.py, run as the host runs it (cwd = WebUI root, its modules importable), installs nothing
    into a WebUI that already has what we need."""
    root = Path(A1111_DIR).resolve()
    env = {**os.environ, "PYTHONPATH": str(root), "COMMANDLINE_ARGS": ""}
    env.pop("VIRTUAL_ENV", None)

    def freeze() -> str:
        out = subprocess.run([_host_python(), "-m", "pip", "freeze"], cwd=root, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    before = freeze()
    run = subprocess.run(
        [_host_python(), str(REPO / "install.py")], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, f"install.py failed:\n{run.stdout}\n{run.stderr}"
    assert freeze() == before, f"install.py changed the WebUI's packages:\n{run.stdout}"


def test_tab_and_routes_registered(a1111):
    """The extension loaded: its tab is in the UI, its settings exist, its routes answer."""
    status, config = a1111.get("/config")
    assert status == 200, f"/config -> {status}"
    text = json.dumps(config)
    assert "LoRA Trainer" in text and "tab_lora_trainer" in text, "the LoRA Trainer tab is not in the UI"
    assert "lora_trainer_error" not in text, "the tab was replaced by its error panel\n" + a1111.log_tail()
    opts = a1111.ok("GET", "/sdapi/v1/options")
    for key in ("lora_trainer_subfolder", "lora_trainer_grid_after_training", "lora_trainer_unload_unused"):
        assert key in opts, f"setting {key} is missing"
    st = a1111.ok("GET", "/lora_trainer/v1/status")
    assert st["running"] is False, st
    # a bad option is refused up front, naming it
    status, body = a1111.post("/lora_trainer/v1/train", {"network_dim": 0})
    assert status == 422 and body.get("field") == "network_dim", (status, body)


def test_train_through_rest_and_generate(a1111, tmp_path_factory):
    from lora_trainer.demo import make_demo_dataset

    prompt = "ohwx ring, blue background"
    state["clip_skip"] = a1111.ok("GET", "/sdapi/v1/options").get("CLIP_stop_at_last_layers")
    before = _txt2img(a1111, prompt)
    state["before"] = before

    data = make_demo_dataset(tmp_path_factory.mktemp("demo"), images=4, size=64, repeats=2)
    name = "trial_ohwx"
    cfg = {
        "train_data_dir": str(data),
        "output_name": name,
        "resolution": 64,
        "network_dim": 4,
        "network_alpha": 4,
        "max_train_epochs": 2,
        "unet_lr": 1e-2,
        "text_encoder_lr": 1e-3,
        "lr_scheduler": "constant",
        "seed": 1,
        "clip_skip": 2,  # the host's option is 1: set for the run, put back after it
        "grid_weights": "0, 1",
        "grid_steps": 2,
    }
    log_mark = len(a1111.log_text())
    started = a1111.ok("POST", "/lora_trainer/v1/train", cfg)
    assert started.get("started") is True, started

    deadline = time.monotonic() + TRAIN_TIMEOUT
    seen = []  # (state, grid done/total) as polled
    while True:
        st = a1111.ok("GET", "/lora_trainer/v1/status")
        seen.append((st["state"], st["grid"]["done"], st["grid"]["total"]))
        if not st["running"]:
            break
        assert time.monotonic() < deadline, f"training still running after {TRAIN_TIMEOUT:.0f} s: {st}"
        time.sleep(0.1)
    # a job that says it is no longer running has ended: nothing of it changes any more (checked at
    # the end of this test, so that the checks below still run and report)
    premature = None
    for _ in range(5):
        time.sleep(0.3)
        again = a1111.ok("GET", "/lora_trainer/v1/status")
        if again["running"] or (again["state"], again["grid"], again["files"]) != (
            st["state"],
            st["grid"],
            st["files"],
        ):
            premature = (
                f"the status said running=false ({st['state']}, grid {st['grid']}) while the job went on: "
                f"then {again['state']}, grid {again['grid']}; states polled: {_transitions(seen)}"
            )
            st = _wait_until_idle(a1111, name, TRAIN_TIMEOUT)
            break
    state["status"] = st
    print(
        "\ntraining status:",
        json.dumps(
            {k: st[k] for k in ("state", "step", "total_steps", "epoch", "loss", "files", "messages", "grid")}, indent=1
        ),
    )
    assert st["error"] in (None, ""), (
        f"training failed: {st['error']}\nmessages: {st['messages']}\n--- WebUI log ---\n{a1111.log_tail()}"
    )
    assert st["state"] == "done", st
    assert st["step"] == st["total_steps"] == 16 and st["epoch"] == 2, st  # 4 images x 2 repeats x 2 epochs
    grid = st["grid"]
    assert grid["total"] == 4 and grid["done"] == grid["total"], f"grid: {grid}"  # 2 files x weights 0, 1
    assert grid["path"] and Path(grid["path"]).is_file(), f"grid: {grid}"
    files = [Path(f["path"]) for f in st["files"]]
    assert [f.name for f in files] == [f"{name}-000001.safetensors", f"{name}.safetensors"], st["files"]
    for f in files:
        assert f.is_file(), f
        assert f.parent.resolve() == (a1111.data_dir / "models" / "Lora").resolve(), (
            f"{f} is not in the WebUI's Lora folder"
        )

    loras = {item["name"]: item for item in a1111.ok("GET", "/sdapi/v1/loras")}
    for f in files:
        assert f.stem in loras, f"{f.stem} is not in /sdapi/v1/loras: {sorted(loras)}"
        meta = loras[f.stem].get("metadata") or {}
        assert meta.get("ss_base_model_version", "").startswith("sd_v1"), (
            f"{f.name}: {meta.get('ss_base_model_version')}"
        )
    aliases = [loras[f.stem]["alias"] for f in files]
    assert len(set(aliases)) == len(aliases), f"duplicate LoRA aliases: {aliases}"

    with_lora = _txt2img(a1111, f"{prompt} <lora:{name}:1>")
    new_log = a1111.log_text()[log_mark:]  # the grid after training loaded the files first
    for bad in ("didn't match keys", f"Network {name} layer", "Couldn't find network", "Traceback"):
        assert bad not in new_log, f"the WebUI's Lora extension said {bad!r}:\n{new_log[-3000:]}"
    after = _txt2img(a1111, prompt)
    assert with_lora != after, "<lora:...:1> did not change the image"
    assert after == before, (
        f"the image without the LoRA changed after training (before {_digest(before)}, after {_digest(after)}): "
        "the host model was not left as it was"
    )
    assert premature is None, premature


def _start_and_wait_for_steps(a1111: Server, name: str, data: Path, steps: int = 2) -> dict:
    cfg = {
        "train_data_dir": str(data),
        "output_name": name,
        "resolution": 64,
        "network_dim": 4,
        "max_train_epochs": 200,  # long: it is stopped early
        "lr_scheduler": "constant",
        "seed": 2,
    }
    a1111.ok("POST", "/lora_trainer/v1/train", cfg)
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while True:
        st = a1111.ok("GET", "/lora_trainer/v1/status")
        assert st["running"] or st["state"] == "done", f"{name}: the run ended before it could be stopped: {st}"
        if st["step"] >= steps:
            return st
        assert time.monotonic() < deadline, f"{name}: no step after {TRAIN_TIMEOUT:.0f} s: {st}"
        time.sleep(0.2)


def _wait_until_idle(a1111: Server, name: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = a1111.ok("GET", "/lora_trainer/v1/status")
        if not st["running"]:
            return st
        assert time.monotonic() < deadline, f"{name}: still running {timeout:.0f} s after the stop: {st}"
        time.sleep(0.3)


@pytest.mark.parametrize("how", ["stop", "stop_and_save", "interrupt"])
def test_stopping_leaves_the_host_as_it_was(a1111, tmp_path_factory, how):
    """/stop discards, /stop_and_save writes the final file, the host's own Interrupt stops the run;
    each time generation is unlocked afterwards and gives the image it gave before training."""
    assert "before" in state, "the training test did not run"
    data = make_demo_dataset_once(tmp_path_factory)
    name = f"trial_{how}"
    _start_and_wait_for_steps(a1111, name, data)
    if how == "interrupt":
        a1111.ok("POST", "/sdapi/v1/interrupt")
    else:
        out = a1111.ok("POST", f"/lora_trainer/v1/{how}")
        assert out["stopping"] is True, out
    st = _wait_until_idle(a1111, name)
    assert st["state"] == "stopped", st
    assert st["error"] in (None, ""), st
    final = a1111.data_dir / "models" / "Lora" / f"{name}.safetensors"
    if how == "stop_and_save":
        assert final.is_file(), f"stop_and_save wrote no {final.name}: {st['files']}"
        assert any(f["final"] and Path(f["path"]) == final for f in st["files"]), st["files"]
        listed = {item["name"] for item in a1111.ok("GET", "/sdapi/v1/loras")}
        assert name in listed, f"{name} is not in /sdapi/v1/loras"
    else:
        assert not final.exists(), f"{how} wrote the final file {final.name}"
    assert st["grid"]["total"] == 0, f"a grid was built after {how}: {st['grid']}"
    after = _txt2img(a1111, TXT2IMG["prompt"])
    assert after == state["before"], f"after {how}, the image without a LoRA differs from the one before training"


_demo_cache: dict = {}


def make_demo_dataset_once(tmp_path_factory) -> Path:
    from lora_trainer.demo import make_demo_dataset

    if "data" not in _demo_cache:
        _demo_cache["data"] = make_demo_dataset(tmp_path_factory.mktemp("demo_stop"), images=4, size=64, repeats=2)
    return _demo_cache["data"]


def test_idle_at_the_end(a1111):
    assert "status" in state, "the training test did not run"
    prog = a1111.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
    job = prog.get("state", {})
    assert prog.get("progress", 0) == 0, prog
    assert not job.get("job"), f"the host still has a job: {job}"
    assert not job.get("interrupted") and not job.get("skipped"), job
    assert a1111.ok("GET", "/lora_trainer/v1/status")["running"] is False
    opts = a1111.ok("GET", "/sdapi/v1/options")
    assert opts.get("CLIP_stop_at_last_layers") == state["clip_skip"], "the host's Clip skip option was left changed"
    log = a1111.log_text()
    for bad in ("didn't match keys", "Traceback"):
        assert bad not in log, f"the WebUI log has {bad!r}"


# --------------------------------------------------------------------------- SDXL


def _lora_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_sdxl_train_through_rest_and_generate(a1111, tmp_path_factory):
    """The tiny SDXL (sgm DiffusionEngine: CLIP-L + OpenCLIP with fused q/k/v) loaded through the host's
    checkpoint option; 2 epochs through /train with the grid; files with SDXL metadata, SGM UNet names and
    separate te2 q/k/v keys, every key matched by the host's Lora extension; te2's q/k/v alone change the
    image (the host folded them into the fused in_proj); without a LoRA the image is bit-identical."""
    from lora_trainer.network.save import save_lora_file

    ckpt = state["sdxl_ckpt"]
    t0 = time.monotonic()
    a1111.ok("POST", "/sdapi/v1/options", {"sd_model_checkpoint": ckpt.name}, timeout=START_TIMEOUT)
    loaded = a1111.ok("GET", "/sdapi/v1/options").get("sd_model_checkpoint", "")
    assert loaded.startswith(ckpt.name), f"the SDXL checkpoint is not loaded: {loaded}\n{a1111.log_tail()}"
    print(f"\nSDXL checkpoint loaded in {time.monotonic() - t0:.1f} s")
    prompt = "ohwx ring, blue background"
    before = _txt2img(a1111, prompt)
    state["sdxl_before"] = before

    log_mark = len(a1111.log_text())
    name = "trial_xl"
    cfg = {
        "train_data_dir": str(make_demo_dataset_once(tmp_path_factory)),
        "output_name": name,
        "resolution": 64,
        "network_dim": 4,
        "network_alpha": 4,
        "max_train_epochs": 2,
        "unet_lr": 1e-2,
        "text_encoder_lr": 1e-2,
        "lr_scheduler": "constant",
        "seed": 1,
        "grid_weights": "0, 1",
        "grid_steps": 2,
    }
    t0 = time.monotonic()
    assert a1111.ok("POST", "/lora_trainer/v1/train", cfg).get("started") is True
    st = _wait_until_idle(a1111, name, TRAIN_TIMEOUT)
    print(f"SDXL training + grid: {time.monotonic() - t0:.1f} s; messages: {st['messages']}")
    assert st["error"] in (None, ""), f"training failed: {st['error']}\n{st['messages']}\n--- WebUI log ---\n{a1111.log_tail()}"
    assert st["state"] == "done" and st["step"] == st["total_steps"] == 16 and st["epoch"] == 2, st
    assert st["grid"]["total"] == 4 and st["grid"]["done"] == 4, st["grid"]
    files = [Path(f["path"]) for f in st["files"]]
    assert [f.name for f in files] == [f"{name}-000001.safetensors", f"{name}.safetensors"], st["files"]

    tensors, meta = _lora_file(files[-1])
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
    loras = {item["name"]: item for item in a1111.ok("GET", "/sdapi/v1/loras")}
    for f in files:
        assert f.stem in loras, f"{f.stem} is not in /sdapi/v1/loras"
        assert (loras[f.stem].get("metadata") or {}).get("ss_base_model_version") == "sdxl_base_v1-0"

    with_lora = _txt2img(a1111, f"{prompt} <lora:{name}:1>")
    # te2's attention only (out_proj zeroed: the host folds q/k/v into in_proj only when out_proj is there too)
    qkv = {k: v for k, v in tensors.items() if k.startswith("lora_te2_") and "_self_attn_" in k}
    for k in qkv:
        if "_out_proj." in k and k.endswith("lora_up.weight"):
            qkv[k] = qkv[k] * 0
    save_lora_file(files[-1].with_name(f"{name}_te2qkv.safetensors"), qkv, {**meta, "ss_output_name": f"{name}_te2qkv"})
    a1111.ok("POST", "/sdapi/v1/refresh-loras")
    te2_only = _txt2img(a1111, f"{prompt} <lora:{name}_te2qkv:4>")
    after = _txt2img(a1111, prompt)
    new_log = a1111.log_text()[log_mark:]
    for bad in ("didn't match keys", f"Network {name}", "Couldn't find network", "Traceback"):
        assert bad not in new_log, f"the WebUI said {bad!r}:\n{new_log[-3000:]}"
    # the control: a key the host cannot place is reported (so the check above can see one)
    bogus = {**qkv, "lora_te2_text_model_encoder_layers_99_self_attn_q_proj.lora_up.weight": qkv[next(iter(qkv))]}
    save_lora_file(files[-1].with_name("trial_bogus_key.safetensors"), bogus, {**meta, "ss_output_name": "trial_bogus_key"})
    a1111.ok("POST", "/sdapi/v1/refresh-loras")
    _txt2img(a1111, f"{prompt} <lora:trial_bogus_key:1>")
    control = [ln for ln in a1111.log_text()[log_mark:].splitlines() if "didn't match keys" in ln]
    assert len(control) == 1 and "trial_bogus_key" in control[0] and "layers_99" in control[0], control
    assert with_lora != before, "<lora:...:1> did not change the SDXL image"
    assert te2_only != before, "te2's q/k/v did not change the image: the host did not apply them to the fused in_proj"
    assert after == before, f"the SDXL image without a LoRA changed after training ({_digest(before)} -> {_digest(after)})"

    # inside the host: our conditioning and UNet output equal the host's, without and with the LoRA
    probe = a1111.ok("GET", f"/lora_trainer_trial/sdxl_probe?name={name}")
    print("SDXL probe (relative max differences: crossattn, vector, UNet output):", probe)
    assert max(probe["base"]) < 1e-5, probe
    assert probe["unmatched"] == [] and probe["modules"] == len(stems), probe
    assert min(probe["lora_effect"]) > 1e-4, probe  # the LoRA changes all three
    assert max(probe["lora"]) < 1e-4, probe  # the host's merged weights (te2 into in_proj) == our hooks / fused path
    assert max(probe["after"]) == 0, probe
    state["sdxl_status"] = st


def test_sdxl_idle_at_the_end(a1111):
    assert "sdxl_status" in state, "the SDXL training test did not run"
    prog = a1111.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
    job = prog.get("state", {})
    assert prog.get("progress", 0) == 0 and not job.get("job"), prog
    assert a1111.ok("GET", "/lora_trainer/v1/status")["running"] is False
    assert a1111.ok("GET", "/sdapi/v1/options").get("CLIP_stop_at_last_layers") == state.get("clip_skip", 1)
    log = a1111.log_text()
    assert "Traceback" not in log, "the WebUI log has a traceback"
    unmatched = [ln for ln in log.splitlines() if "didn't match keys" in ln and "trial_bogus_key" not in ln]
    assert not unmatched, f"the WebUI's Lora extension left keys unmatched: {unmatched}"


# --------------------------------------------------------------------------- SD2


def test_sd2_train_through_rest_and_generate(a1111, tmp_path_factory):
    """The tiny SD2 (ldm LatentDiffusion, v-prediction, FrozenOpenCLIPEmbedder penultimate: fused q/k/v)
    loaded through the checkpoint option; 2 epochs through /train with the text encoder and the grid; SD2
    metadata (clip_skip 1: A1111 ignores Clip skip for SD2), diffusers-style UNet names and ``lora_te_`` q/k/v
    keys for the two blocks the host runs, every key matched by the host's Lora extension; te q/k/v alone
    change the image (folded into the fused ``in_proj``); without a LoRA the image is bit-identical; in the
    host, our conditioning and UNet output equal the host's, with the LoRA too."""
    from lora_trainer.network.save import save_lora_file

    ckpt = state["sd2_ckpt"]
    t0 = time.monotonic()
    a1111.ok("POST", "/sdapi/v1/options", {"sd_model_checkpoint": ckpt.name}, timeout=START_TIMEOUT)
    loaded = a1111.ok("GET", "/sdapi/v1/options").get("sd_model_checkpoint", "")
    assert loaded.startswith(ckpt.name), f"the SD2 checkpoint is not loaded: {loaded}\n{a1111.log_tail()}"
    print(f"\nSD2 checkpoint loaded in {time.monotonic() - t0:.1f} s")
    clip_skip = a1111.ok("GET", "/sdapi/v1/options").get("CLIP_stop_at_last_layers")
    prompt = "ohwx ring, blue background"
    before = _txt2img(a1111, prompt)

    log_mark = len(a1111.log_text())
    name = "trial_sd2"
    cfg = {
        "train_data_dir": str(make_demo_dataset_once(tmp_path_factory)),
        "output_name": name,
        "resolution": 64,
        "network_dim": 4,
        "network_alpha": 4,
        "max_train_epochs": 2,
        "unet_lr": 1e-2,
        "text_encoder_lr": 1e-2,
        "lr_scheduler": "constant",
        "seed": 1,
        "clip_skip": 2,  # not used for SD2: said so, recorded as 1, the host's option untouched
        "grid_weights": "0, 1",
        "grid_steps": 2,
    }
    t0 = time.monotonic()
    assert a1111.ok("POST", "/lora_trainer/v1/train", cfg).get("started") is True
    st = _wait_until_idle(a1111, name, TRAIN_TIMEOUT)
    print(f"SD2 training + grid: {time.monotonic() - t0:.1f} s; messages: {st['messages']}")
    assert st["error"] in (None, ""), f"training failed: {st['error']}\n{st['messages']}\n--- WebUI log ---\n{a1111.log_tail()}"
    assert st["state"] == "done" and st["step"] == st["total_steps"] == 16 and st["epoch"] == 2, st
    assert st["grid"]["total"] == 4 and st["grid"]["done"] == 4, st["grid"]
    assert any("SD2: clip_skip is not used" in m for m in st["messages"]), st["messages"]
    assert not any("cannot take" in m for m in st["messages"]), st["messages"]
    files = [Path(f["path"]) for f in st["files"]]
    assert [f.name for f in files] == [f"{name}-000001.safetensors", f"{name}.safetensors"], st["files"]

    tensors, meta = _lora_file(files[-1])
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
    loras = {item["name"]: item for item in a1111.ok("GET", "/sdapi/v1/loras")}
    for f in files:
        assert f.stem in loras, f"{f.stem} is not in /sdapi/v1/loras"
        assert (loras[f.stem].get("metadata") or {}).get("ss_base_model_version") == "sd_v2_v"

    with_lora = _txt2img(a1111, f"{prompt} <lora:{name}:1>")
    # the text encoder's attention only (with out_proj zeroed: the host folds q/k/v into in_proj only when
    # out_proj is there too)
    qkv = {k: v for k, v in tensors.items() if k.startswith("lora_te_") and "_self_attn_" in k}
    for k in qkv:
        if "_out_proj." in k and k.endswith("lora_up.weight"):
            qkv[k] = qkv[k] * 0
    save_lora_file(files[-1].with_name(f"{name}_teqkv.safetensors"), qkv, {**meta, "ss_output_name": f"{name}_teqkv"})
    a1111.ok("POST", "/sdapi/v1/refresh-loras")
    te_only = _txt2img(a1111, f"{prompt} <lora:{name}_teqkv:4>")
    after = _txt2img(a1111, prompt)
    new_log = a1111.log_text()[log_mark:]
    for bad in ("didn't match keys", f"Network {name}", "Couldn't find network", "Traceback"):
        assert bad not in new_log, f"the WebUI said {bad!r}:\n{new_log[-3000:]}"
    assert with_lora != before, "<lora:...:1> did not change the SD2 image"
    assert te_only != before, "the text encoder's q/k/v did not change the image: the host did not apply them to the fused in_proj"
    assert after == before, f"the SD2 image without a LoRA changed after training ({_digest(before)} -> {_digest(after)})"
    assert a1111.ok("GET", "/sdapi/v1/options").get("CLIP_stop_at_last_layers") == clip_skip

    probe = a1111.ok("GET", f"/lora_trainer_trial/sd2_probe?name={name}")
    print("SD2 probe (relative max differences: conditioning, UNet output):", probe)
    assert probe["te_blocks"] == OPENCLIP_SD2_TEXT["layers"] and probe["te_layers"] == run_layers, probe
    assert max(probe["base"]) == 0, probe  # the same host code path
    assert probe["unmatched"] == [] and probe["modules"] == len(stems), probe
    assert min(probe["lora_effect"]) > 1e-4, probe
    assert max(probe["lora"]) < 1e-4, probe  # the host's merged weights (q/k/v folded into in_proj) == our hooks / fused path
    assert max(probe["after"]) == 0, probe
    state["sd2_status"] = st


def test_sd2_idle_at_the_end(a1111):
    assert "sd2_status" in state, "the SD2 training test did not run"
    prog = a1111.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
    job = prog.get("state", {})
    assert prog.get("progress", 0) == 0 and not job.get("job"), prog
    assert a1111.ok("GET", "/lora_trainer/v1/status")["running"] is False
    log = a1111.log_text()
    assert "Traceback" not in log, "the WebUI log has a traceback"
    unmatched = [ln for ln in log.splitlines() if "didn't match keys" in ln and "trial_bogus_key" not in ln]
    assert not unmatched, f"the WebUI's Lora extension left keys unmatched: {unmatched}"


# --------------------------------------------------------------------------- --medvram / --lowvram (last: it reloads the model)


def test_medvram_in_the_host(a1111, tmp_path_factory):
    """The host's own --medvram (its lowvram hooks on the SD2 model, on CPU, where its moves are no-ops but
    its bookkeeping is real): a run with the text encoder trains every adapter, and afterwards every forward
    pre-hook is back in its place and order, ``module_in_gpu`` is as before and the image is bit-identical.
    With --lowvram the run is refused, naming the flag, and nothing changes."""
    assert "sd2_status" in state, "the SD2 training test did not run"
    status = a1111.ok("GET", "/lora_trainer_trial/offload?mode=medvram", timeout=START_TIMEOUT)
    assert status["lowvram"] and status["unet_hooks"] and status["unet_hooks"][-1].endswith("send_me_to_gpu"), status
    prompt = "ohwx ring, blue background"
    before = _txt2img(a1111, prompt)
    before_status = a1111.ok("GET", "/lora_trainer_trial/offload")
    name = "trial_medvram"
    cfg = {
        "train_data_dir": str(make_demo_dataset_once(tmp_path_factory)),
        "output_name": name,
        "resolution": 64,
        "network_dim": 4,
        "max_train_epochs": 1,
        "unet_lr": 1e-2,
        "text_encoder_lr": 1e-2,
        "lr_scheduler": "constant",
        "seed": 1,
        "grid_after_training": False,
    }
    assert a1111.ok("POST", "/lora_trainer/v1/train", cfg).get("started") is True
    st = _wait_until_idle(a1111, name, TRAIN_TIMEOUT)
    assert st["error"] in (None, ""), f"training failed: {st['error']}\n{st['messages']}\n--- WebUI log ---\n{a1111.log_tail()}"
    assert st["state"] == "done" and st["step"] == st["total_steps"] == 8, st
    assert any("--medvram" in m for m in st["messages"]), st["messages"]
    tensors, _ = _lora_file(Path(st["files"][-1]["path"]))
    dead = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0]
    assert not dead and any(k.startswith("lora_te_") for k in tensors), dead[:3]
    after_status = a1111.ok("GET", "/lora_trainer_trial/offload")
    print(
        f"\n--medvram: {before_status['lowvram_hooks']} lowvram hooks, on sd_model.model {before_status['unet_hooks']}, "
        f"module_in_gpu {before_status['module_in_gpu']} -> after training {after_status['lowvram_hooks']} hooks, "
        f"module_in_gpu {after_status['module_in_gpu']}; messages: {st['messages'][:2]}"
    )
    assert after_status == before_status, (before_status["unet_hooks"], after_status["unet_hooks"])
    assert _txt2img(a1111, prompt) == before, "the image without a LoRA changed after a --medvram training"

    a1111.ok("GET", "/lora_trainer_trial/offload?mode=lowvram_on")
    try:
        assert a1111.ok("POST", "/lora_trainer/v1/train", {**cfg, "output_name": "trial_lowvram"}).get("started") is True
        st = _wait_until_idle(a1111, "trial_lowvram", TRAIN_TIMEOUT)
    finally:
        a1111.ok("GET", "/lora_trainer_trial/offload?mode=lowvram_off")
    assert st["state"] == "failed" and "--lowvram" in (st["error"] or "") and "--medvram" in st["error"], st
    assert not st["files"], st["files"]
    assert a1111.ok("GET", "/lora_trainer_trial/offload") == before_status
    assert _txt2img(a1111, prompt) == before
    prog = a1111.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
    assert prog.get("progress", 0) == 0 and not prog.get("state", {}).get("job"), prog
    assert "Traceback" not in a1111.log_text(), "the WebUI log has a traceback"
