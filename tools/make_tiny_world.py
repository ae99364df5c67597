#!/usr/bin/env python
"""Build the tiny world's pretrained models (CPU only: about 20 minutes each on a busy 2-core machine).

    python tools/make_tiny_world.py --out lora_trainer/assets/tiny_world                     # SD1.5 architecture
    python tools/make_tiny_world.py --arch sdxl --out lora_trainer/assets/tiny_world_sdxl    # its SDXL twin

SD1.5 architecture (``--arch sd15``, the default):

1. VAE (SD's shape: 8x downsampling, 4 latent channels) trained as an autoencoder on world
   pictures and on generic pictures of overlapping shapes; its latents are then rescaled
   exactly (quant_conv / post_quant_conv) so SD's scaling factor 0.18215 gives unit variance.
   Then the decoder alone at full size (encoder frozen), in a second process beside step 2.
2. UNet and CLIP text encoder trained together from scratch on captioned world pictures ("a red
   circle on a blue background"), with 10% empty captions for classifier-free guidance.
3. A check: pictures sampled for world prompts are read back by the deterministic classifier.
4. Saved in fp16 as a diffusers folder and, inside it, as an A1111-layout single file.

SDXL twin (``--arch sdxl``): the same world and the same steps 2-4, on SDXL's architecture: two
text encoders (CLIPTextModel and CLIPTextModelWithProjection; the UNet's context is both
penultimate hidden states concatenated, the second one's pooled projection and the size/crop
``time_ids`` go into its additional embedding). The VAE is not trained again: the SD1.5 world's
(``--vae-from``, SDXL's VAE has the same shape) with its latents rescaled exactly for SDXL's scaling
factor 0.13025, so the scaled latents are those the SD1.5 world's UNet learnt from. Saved in fp16
as a diffusers SDXL folder and, inside it, as an SGM-layout single file (A1111/Forge/ComfyUI).

Everything is seeded (``--seed``); the same seed and settings on the same torch build give the
same model. ``build_info.json`` in the output folder records the settings, times and checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Threads that wait passively: on a machine shared with other processes, spinning OpenMP threads
# make CPU training several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lora_trainer.model.sd import DiffusersSD, alphas_cumprod_from_config  # noqa: E402
from lora_trainer.model.tiny import SD_SCHEDULER, write_tiny_tokenizer  # noqa: E402
from lora_trainer.world.drawing import (  # noqa: E402
    OHWX,
    concept_scene,
    generic_picture,
    random_scene,
    render,
    to_array,
)
from lora_trainer.world.model import (  # noqa: E402
    ASSET_DIR,
    RESOLUTION,
    SDXL_SINGLE_FILE_NAME,
    SINGLE_FILE_NAME,
    WORLD_CLIP,
    WORLD_SDXL_UNET,
    WORLD_SDXL_VAE,
    WORLD_TE1,
    WORLD_TE2,
    WORLD_UNET,
    WORLD_VAE,
)

T0 = time.time()


def log(msg: str) -> None:
    el = time.time() - T0
    print(f"[{int(el) // 60:02d}:{int(el) % 60:02d}] {msg}", flush=True)


def to_tensor(imgs: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------ VAE
def vae_batch(rng: random.Random, n: int) -> torch.Tensor:
    """World pictures and generic pictures of overlapping shapes, half and half."""
    return to_tensor(
        [to_array(render(random_scene(rng), RESOLUTION)) if rng.random() < 0.5 else to_array(generic_picture(rng, RESOLUTION)) for _ in range(n)]
    )


def train_vae(args, rng: random.Random) -> torch.nn.Module:
    """Encoder and decoder together on 32x32 crops (the VAE is fully convolutional: 4x cheaper than 64x64)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**WORLD_VAE)
    with torch.no_grad():  # start with little posterior noise (std ~0.02): it learns many times faster
        vae.quant_conv.bias[WORLD_VAE["latent_channels"] :] = -8.0
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, {args.vae_steps} steps of {args.vae_batch} crops")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    recent: list[float] = []
    c = RESOLUTION // 2
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, 50, floor=0.3)
        x = vae_batch(rng, args.vae_batch)
        ox, oy = rng.randrange(0, RESOLUTION - c + 1, 8), rng.randrange(0, RESOLUTION - c + 1, 8)
        x = x[:, :, oy : oy + c, ox : ox + c]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn_like(post.mean)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            el = time.time() - t0
            log(
                f"VAE step {step + 1}/{args.vae_steps} loss {sum(recent) / len(recent):.4f} "
                f"({el:.0f} s, eta {el / (step + 1) * (args.vae_steps - step - 1):.0f} s)"
            )
            recent.clear()
    vae.eval()
    return vae


def finetune_decoder(state_path: str, out_path: str, steps: int, batch: int, lr: float, seed: int, threads: int, t_start: float, log_every: int) -> None:
    """The decoder alone at full size, encoder frozen (so the latents the UNet learns from stay valid).
    Runs in a second process beside the UNet's training: one thread each uses two cores without
    the threads of one process waiting for each other."""
    global T0
    T0 = t_start
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(**WORLD_VAE)
    vae.load_state_dict(torch.load(state_path))
    vae.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p_ in params:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    recent: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, 20, floor=0.1)
        x = vae_batch(rng, batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            log(f"  decoder step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} ({el:.0f} s, eta {el / (step + 1) * (steps - step - 1):.0f} s)")
            recent.clear()
    torch.save({k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}, out_path)


@torch.no_grad()
def scale_latent_space(vae, k: float) -> None:
    """Make the VAE's latents ``k`` times larger, exactly: the encoder's mean (and log-variance)
    through quant_conv, the decoder's input through post_quant_conv; decoding is unchanged."""
    c = vae.config.latent_channels
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    qc.weight[:c] *= k
    qc.bias[:c] *= k
    qc.bias[c:] += 2 * math.log(k)  # logvar of k * z
    pqc.weight /= k


@torch.no_grad()
def rescale_latents(vae, rng: random.Random) -> float:
    """Scale the latent space exactly so that ``latents * 0.18215`` has unit variance, as in SD."""
    x = to_tensor([to_array(render(random_scene(rng), RESOLUTION)) for _ in range(256)])
    std = float(vae.encode(x).latent_dist.mean.std())
    k = (1.0 / WORLD_VAE["scaling_factor"]) / std
    scale_latent_space(vae, k)
    check = float(vae.encode(x).latent_dist.mean.std()) * WORLD_VAE["scaling_factor"]
    log(f"latents rescaled by {k:.3f}: std of scaled latents {check:.3f}")
    return k


@torch.no_grad()
def vae_check(vae, rng: random.Random) -> dict:
    """Reconstruct world pictures and pictures of the (unseen) concept; read them back."""
    from lora_trainer.world.detect import find_concept, read_picture

    scenes = [random_scene(rng) for _ in range(64)]
    x = to_tensor([to_array(render(s, RESOLUTION)) for s in scenes])
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    world = float(np.mean([read_picture(im).matches(s.shape, s.colour, s.background) for im, s in zip(imgs, scenes)]))
    cx = to_tensor([to_array(render(concept_scene(rng, OHWX), RESOLUTION)) for _ in range(32)])
    crec = vae.decode(vae.encode(cx).latent_dist.mean).sample
    cimgs = ((crec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    concept = float(np.mean([find_concept(im, OHWX).found for im in cimgs]))
    mae = float((rec - x).abs().mean() * 127.5)
    log(f"VAE check: world pictures read right {world:.0%}, concept found in {concept:.0%} of reconstructions, MAE {mae:.1f}/255")
    return {"world_read_back": world, "concept_read_back": concept, "mae_255": mae}


@torch.no_grad()
def world_vae_for_sdxl(folder: str):
    """The SD1.5 world's VAE (same shape as SDXL's) with its latents rescaled exactly for SDXL's
    scaling factor: ``latents * 0.13025`` are the SD1.5 world's ``latents * 0.18215``."""
    from diffusers import AutoencoderKL

    sd1 = AutoencoderKL.from_pretrained(Path(folder) / "vae", local_files_only=True)
    if float(sd1.config.scaling_factor) != WORLD_VAE["scaling_factor"]:
        raise SystemExit(f"{folder}: the VAE's scaling factor is {sd1.config.scaling_factor}, not SD's {WORLD_VAE['scaling_factor']}")
    vae = AutoencoderKL(**WORLD_SDXL_VAE)
    vae.load_state_dict({k: v.float() for k, v in sd1.state_dict().items()})
    k = WORLD_VAE["scaling_factor"] / WORLD_SDXL_VAE["scaling_factor"]
    scale_latent_space(vae, k)
    vae.eval()
    x = to_tensor([to_array(render(random_scene(random.Random(7)), RESOLUTION)) for _ in range(32)])
    a = sd1.float().encode(x).latent_dist.mean * WORLD_VAE["scaling_factor"]
    b = vae.encode(x).latent_dist.mean * WORLD_SDXL_VAE["scaling_factor"]
    log(f"VAE from {folder}: latents rescaled by {k:.5f} for SDXL's factor {WORLD_SDXL_VAE['scaling_factor']} (scaled latents differ by at most {float((a - b).abs().max()):.1e})")
    return vae


# ----------------------------------------------------------------------------------- UNet + TE
def make_denoiser(arch: str, tokenizer):
    """The UNet and text encoder(s) of ``arch``, freshly initialised, and ``predict(x_t, t, ids, per)``:
    the UNet's output for ``x_t`` with ``per`` pictures for each caption of token ids ``ids``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids_cfg = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "sd15":
        unet = UNet2DConditionModel(**WORLD_UNET)
        te = CLIPTextModel(CLIPTextConfig(**ids_cfg, **WORLD_CLIP))

        def predict(x_t, t, ids, per):
            cond = te(ids)[0].repeat_interleave(per, dim=0)
            return unet(x_t, t, encoder_hidden_states=cond).sample

        return unet, [te], predict

    from lora_trainer.model.sdxl import time_ids_from_sizes

    unet = UNet2DConditionModel(**WORLD_SDXL_UNET)
    te1 = CLIPTextModel(CLIPTextConfig(**ids_cfg, **WORLD_TE1))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids_cfg, **WORLD_TE2))
    # every picture of the world is drawn at its full size: original = target = 64x64, crop (0, 0)
    time_ids = time_ids_from_sizes([(RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)])

    def predict_sdxl(x_t, t, ids, per):
        o1 = te1(ids, output_hidden_states=True)
        o2 = te2(ids, output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1).repeat_interleave(per, dim=0)
        added = {"text_embeds": o2.text_embeds.repeat_interleave(per, dim=0), "time_ids": time_ids.expand(x_t.shape[0], -1)}
        return unet(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    return unet, [te1, te2], predict_sdxl


def train_unet_te(args, vae, tokenizer, rng: random.Random):
    scaling = float(vae.config.scaling_factor)
    log(f"encoding {args.images} world pictures")
    scenes = [random_scene(rng) for _ in range(args.images)]
    lat_list = []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            x = to_tensor([to_array(render(s, RESOLUTION)) for s in scenes[i : i + 256]])
            lat_list.append(vae.encode(x).latent_dist.mean * scaling)
    latents = torch.cat(lat_list)
    log(f"latents {tuple(latents.shape)}, std {float(latents.std()):.3f}")

    torch.manual_seed(args.seed + 1)
    unet, encoders, predict = make_denoiser(args.arch, tokenizer)
    n_u = sum(p.numel() for p in unet.parameters())
    n_t = sum(p.numel() for te in encoders for p in te.parameters())
    log(
        f"UNet {n_u / 1e6:.2f}M, text encoder{'s' if len(encoders) > 1 else ''} {n_t / 1e6:.2f}M parameters; "
        f"{args.unet_steps} steps of {args.unet_batch} pictures ({args.captions_per_batch} captions)"
    )
    params = list(unet.parameters()) + [p for te in encoders for p in te.parameters()]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ac = alphas_cumprod_from_config(SD_SCHEDULER)
    snr = ac / (1 - ac)
    token_cache: dict[str, torch.Tensor] = {}

    def tokens(captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in token_cache:
                token_cache[c] = tokenizer(c, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([token_cache[c] for c in captions])

    variants = ("full",) * 7 + ("no_colour", "no_background", "empty")
    gen = torch.Generator().manual_seed(args.seed + 2)
    # pictures grouped by what they show: a batch takes a few captions with several pictures each, so
    # the text encoder (77 tokens a caption) runs once per caption instead of once per picture
    groups: dict[tuple, list[int]] = {}
    for i, sc in enumerate(scenes):
        groups.setdefault((sc.shape, sc.colour, sc.background), []).append(i)
    keys = sorted(groups)
    per = args.unet_batch // args.captions_per_batch
    unet.train()
    for te in encoders:
        te.train()
    t0 = time.time()
    recent: list[float] = []
    for step in range(args.unet_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.unet_steps, args.unet_lr, 100)
        chosen = torch.randint(0, len(keys), (args.captions_per_batch,), generator=gen).tolist()
        idx, captions = [], []
        for k in chosen:
            members = groups[keys[k]]
            pick = torch.randint(0, len(members), (per,), generator=gen).tolist()
            idx += [members[j] for j in pick]
            captions.append(scenes[members[pick[0]]].caption(rng.choice(variants)))
        x0 = latents[torch.tensor(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(ac), (x0.shape[0],), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = predict(x_t, t, tokens(captions), per)
        w = torch.clamp(snr[t], max=args.min_snr) / snr[t]  # min-SNR-5 weighting (epsilon target)
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            el = time.time() - t0
            log(
                f"UNet+TE step {step + 1}/{args.unet_steps} loss {sum(recent) / len(recent):.4f} "
                f"({el:.0f} s, eta {el / (step + 1) * (args.unet_steps - step - 1):.0f} s)"
            )
            recent.clear()
    unet.eval()
    for te in encoders:
        te.eval()
    return unet, encoders


# ----------------------------------------------------------------------------------------- save
def save(parts: DiffusersSD, out: Path) -> dict:
    from safetensors.torch import save_file

    from lora_trainer.model.ldm_names import to_a1111_checkpoint
    from lora_trainer.model.tiny import save_diffusers_folder

    for m in (parts.unet, parts.vae, parts.text_encoder):
        m.to(torch.float16)
    if out.exists():
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.rmtree(out / sub, ignore_errors=True)
    save_diffusers_folder(parts, out)
    ckpt = to_a1111_checkpoint(
        parts.unet.state_dict(),
        parts.vae.state_dict(),
        parts.text_encoder.state_dict(),
        dict(parts.unet.config),
        dict(parts.vae.config),
    )
    save_file({k: v.contiguous() for k, v in ckpt.items()}, out / SINGLE_FILE_NAME, metadata={"format": "pt"})
    for m in (parts.unet, parts.vae, parts.text_encoder):
        m.to(torch.float32)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return sizes


def save_sdxl(parts, out: Path) -> dict:
    """fp16 diffusers SDXL folder and, inside it, the SGM-layout single file."""
    from safetensors.torch import save_file

    from lora_trainer.model.sdxl import to_sgm_checkpoint
    from lora_trainer.model.tiny_sdxl import save_sdxl_diffusers_folder

    modules = (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2)
    for m in modules:
        m.to(torch.float16)
    if out.exists():
        for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            shutil.rmtree(out / sub, ignore_errors=True)
    save_sdxl_diffusers_folder(parts, out)
    ckpt = to_sgm_checkpoint(parts)
    save_file({k: v.contiguous() for k, v in ckpt.items()}, out / SDXL_SINGLE_FILE_NAME, metadata={"format": "pt"})
    for m in modules:
        m.to(torch.float32)
    return {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15", help="SD1.5 architecture, or its SDXL twin")
    p.add_argument("--out", help="output folder (default: lora_trainer/assets/tiny_world, or tiny_world_sdxl for --arch sdxl)")
    p.add_argument("--vae-from", default=str(ASSET_DIR.relative_to(Path(__file__).resolve().parent.parent)),
                   help="--arch sdxl: the SD1.5 world whose VAE is reused (not trained again)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; 1 is faster on a busy machine)")
    p.add_argument("--vae-steps", type=int, default=1000, help="encoder + decoder steps on 32x32 crops")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-5)
    p.add_argument("--decoder-steps", type=int, default=900, help="decoder-only steps at 64x64, beside the UNet's")
    p.add_argument("--decoder-batch", type=int, default=16)
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--images", type=int, default=10000, help="world pictures the UNet learns from")
    p.add_argument("--unet-steps", type=int, default=2000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--captions-per-batch", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--check-samples", type=int, default=60, help="world prompts sampled and read back at the end")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "lora_trainer/assets/tiny_world" + ("_sdxl" if args.arch == "sdxl" else "")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    log(f"tiny world ({args.arch}): seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads -> {out}")

    from transformers import CLIPTokenizer

    tok_dir = Path(tempfile.mkdtemp(prefix="tiny_world_tok_"))
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    if args.arch == "sdxl":
        return main_sdxl(args, argv, out, rng, tokenizer, tok_dir)

    t_vae = time.time()
    vae = train_vae(args, rng)
    rescale_latents(vae, rng)
    t_vae = time.time() - t_vae

    # the decoder is fine-tuned at full size in a second process while the UNet learns
    state_path, dec_path = str(tok_dir / "vae.pt"), str(tok_dir / "decoder.pt")
    torch.save(vae.state_dict(), state_path)
    import multiprocessing as mp

    child = mp.get_context("spawn").Process(
        target=finetune_decoder,
        args=(state_path, dec_path, args.decoder_steps, args.decoder_batch, args.decoder_lr, args.seed + 50, args.threads, T0, args.log_every),
    )
    child.start()
    t_unet = time.time()
    unet, (te,) = train_unet_te(args, vae, tokenizer, rng)
    t_unet = time.time() - t_unet
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"the decoder fine-tuning process failed (exit code {child.exitcode})")
    vae.load_state_dict(torch.load(dec_path), strict=False)
    vae.eval()
    t_parallel = time.time() - T0 - t_vae
    checks = {"vae": vae_check(vae, random.Random(args.seed + 100))}

    parts = DiffusersSD(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer, scheduler_config=dict(SD_SCHEDULER), name="tiny_world")
    from lora_trainer.world.sample import Sampler
    from lora_trainer.world.score import world_accuracy

    sampler = Sampler.from_parts(parts)
    acc = world_accuracy(sampler, n=args.check_samples, seed=1000)
    log(
        f"check: {acc.accuracy:.0%} of {acc.n} sampled world pictures read right "
        f"(shape {acc.shape:.0%}, colour {acc.colour:.0%}, background {acc.background:.0%})"
    )
    checks["world_fp32"] = acc.as_dict()
    sizes = save(parts, out)
    from lora_trainer.world.model import load_tiny_world

    acc16 = world_accuracy(Sampler.from_parts(load_tiny_world(out)), n=args.check_samples, seed=1000)
    log(f"check after the fp16 round trip: {acc16.accuracy:.0%} read right")
    checks["world_fp16"] = acc16.as_dict()
    total = time.time() - T0
    info = {
        "command": "python tools/make_tiny_world.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": {
            "vae": round(t_vae, 1),
            "unet_text_encoder": round(t_unet, 1),
            "unet_and_decoder_in_parallel": round(t_parallel, 1),
            "total": round(total, 1),
        },
        "parameters": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in te.parameters()),
        },
        "checks": checks,
        "file_bytes": sizes,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"saved to {out}: {sum(sizes.values()) / 1e6:.1f} MB in {len(sizes)} files; total {total / 60:.1f} min")
    shutil.rmtree(tok_dir, ignore_errors=True)
    return 0


def main_sdxl(args, argv, out: Path, rng: random.Random, tokenizer, tok_dir: Path) -> int:
    """The SDXL twin: the SD1.5 world's VAE rescaled, UNet and both text encoders trained, checked, saved."""
    from lora_trainer.model.sdxl import DiffusersSDXL
    from lora_trainer.model.tiny_sdxl import SDXL_SCHEDULER
    from lora_trainer.world.model import load_tiny_world_sdxl
    from lora_trainer.world.sample import Sampler
    from lora_trainer.world.score import world_accuracy

    t_vae = time.time()
    vae = world_vae_for_sdxl(args.vae_from)
    t_vae = time.time() - t_vae
    t_unet = time.time()
    unet, (te1, te2) = train_unet_te(args, vae, tokenizer, rng)
    t_unet = time.time() - t_unet
    checks = {"vae": vae_check(vae, random.Random(args.seed + 100))}
    parts = DiffusersSDXL(
        unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler_config=dict(SDXL_SCHEDULER), name="tiny_world_sdxl",
    )
    acc = world_accuracy(Sampler.from_parts(parts), n=args.check_samples, seed=1000)
    log(
        f"check: {acc.accuracy:.0%} of {acc.n} sampled world pictures read right "
        f"(shape {acc.shape:.0%}, colour {acc.colour:.0%}, background {acc.background:.0%})"
    )
    checks["world_fp32"] = acc.as_dict()
    sizes = save_sdxl(parts, out)
    acc16 = world_accuracy(Sampler.from_parts(load_tiny_world_sdxl(out)), n=args.check_samples, seed=1000)
    log(f"check after the fp16 round trip: {acc16.accuracy:.0%} read right")
    checks["world_fp16"] = acc16.as_dict()
    total = time.time() - T0
    skipped = ("vae_steps", "vae_batch", "vae_lr", "vae_kl", "decoder_steps", "decoder_batch", "decoder_lr")
    info = {
        "command": "python tools/make_tiny_world.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in skipped},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": {"vae_rescale": round(t_vae, 1), "unet_text_encoders": round(t_unet, 1), "total": round(total, 1)},
        "parameters": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in te1.parameters()),
            "text_encoder_2": sum(p.numel() for p in te2.parameters()),
        },
        "checks": checks,
        "file_bytes": sizes,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"saved to {out}: {sum(sizes.values()) / 1e6:.1f} MB in {len(sizes)} files; total {total / 60:.1f} min")
    shutil.rmtree(tok_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
