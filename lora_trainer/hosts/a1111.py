"""The AUTOMATIC1111 host: trains on ``shared.sd_model`` as the WebUI holds it (no second copy, no reload).

Every ``modules.*`` / ``networks`` import is inside a function, so this file imports without the
WebUI (tests put a fake ``modules`` package in ``sys.modules``). What the host does and where its
traps are is written up in docs/HOSTS.md; the ones handled here:

* LoRAs the host merged into the weights (``<lora:..>`` of the last generation) are cleared first,
  so a training never bakes them in (HOSTS.md section 4);
* ldm's own activation checkpointing (``use_checkpoint`` / ``checkpoint`` flags) would drop the
  gradients of our hook-based LoRA, so it is switched off for the run and put back afterwards; the
  ``gradient_checkpointing`` option uses ``torch.utils.checkpoint`` non-reentrant instead;
* generation is locked out with the host's ``call_queue.queue_lock`` for the whole run; progress goes
  to ``shared.state`` (``/sdapi/v1/progress``), and the host's Interrupt stops the run.

SDXL (sgm's ``DiffusionEngine``): the text goes through the host's own embedder wrappers
(``conditioner.embedders[0]`` CLIP-L, ``[1]`` OpenCLIP bigG: chunking, emphasis, embeddings) but not
through ``GeneralConditioner.forward``, which runs frozen embedders under ``no_grad``; the UNet's ``y``
is the pooled output followed by the host's size embedders of each image's sizes, in the
conditioner's order, as ``get_learned_conditioning`` builds it. OpenCLIP's q/k/v are one fused
``in_proj`` in ``nn.MultiheadAttention``: their LoRAs are applied through the attention's weights
(``network.lora.FusedAttentionLoRA``) and saved as separate ``lora_te2_..._{q,k,v}_proj`` keys.

SD2: the text encoder is ldm's ``FrozenOpenCLIPEmbedder`` (``cond_stage_model.wrapped``), an OpenCLIP
tower with the same fused q/k/v, run up to ``len(resblocks) - layer_idx`` blocks (the penultimate layer);
its LoRA has kohya's SD2 names (``lora_te_text_model_encoder_layers_N_...``, the HF CLIPTextModel that
keeps those blocks), which the host's Lora extension maps back onto ``model.transformer.resblocks.N``.

``--medvram`` / ``--medvram-sdxl`` (``modules.lowvram``): see :class:`_Offloading`. ``--lowvram`` is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import LoraTrainerError
from ..model.bundle import ModelBundle
from ..model.ldm import checkpoint_ldm_unet_blocks
from ..model.sdxl import SDXLCond, time_ids_from_sizes
from ..network.targets import (
    TEXT_CONTAINERS,
    UNET_ATTENTION_CONTAINERS,
    UNET_CONV_CONTAINERS,
    Target,
    find_targets,
    openclip_text_targets,
)
from ..train.events import CachingProgress, Event, EventBus, FileSaved, StepEvent, StopControl, TrainingStarted
from ..train.runtime import Runtime
from .webui_common import (
    HostKeyCheck,
    HostLayer,
    HostLoaderMissing,
    HostMatch,
    acquire_queue_lock,
    build_grid_locked,
    checked_after_save,
    finite_latents,
    grid_after_training_in_host,
    rescan_loras,
    txt2img_cell,
    webui_lora_dir,
)

log = logging.getLogger("lora_trainer")

JOB_NAME = "LoRA training"
CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"


def _shared():
    from modules import shared

    return shared


def _networks_module():
    """The built-in Lora extension's ``networks`` module, or None when it is not loaded."""
    mod = sys.modules.get("networks")
    if mod is None:
        try:
            mod = importlib.import_module("networks")
        except Exception:  # noqa: BLE001 - the Lora extension is disabled or absent
            return None
    return mod if hasattr(mod, "loaded_networks") or hasattr(mod, "list_available_networks") else None


def _network_on_disk(networks: Any, path: Path) -> Any:
    """The Lora extension's entry for ``path``: the listed one when it is this very file (another
    folder may hold the same name), else a new ``network.NetworkOnDisk``."""
    listed = getattr(networks, "available_networks", {}).get(path.stem)
    if listed is not None and os.path.abspath(getattr(listed, "filename", "")) == os.path.abspath(path):
        return listed
    try:
        network = sys.modules.get("network") or importlib.import_module("network")
    except ImportError as e:
        raise HostLoaderMissing(f"its Lora extension's network module is not loaded ({e})") from None
    return network.NetworkOnDisk(path.stem, str(path))


_QKV_SUFFIXES = ("_q_proj", "_k_proj", "_v_proj")


def _a1111_layer_shape(sd_module: Any, sd_key: str) -> tuple[int, ...] | None:
    """The weight shape a matched LoRA module is added to. OpenCLIP's q/k/v LoRAs land on the fused
    ``MultiheadAttention``, which adds each to one third of ``in_proj_weight``."""
    weight = getattr(sd_module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    fused = getattr(sd_module, "in_proj_weight", None)
    if isinstance(fused, torch.Tensor) and sd_key.endswith(_QKV_SUFFIXES):
        return (fused.shape[0] // 3, *fused.shape[1:])
    return None


def a1111_key_match(path: Path) -> HostMatch:
    """What A1111's Lora extension applies of the file at ``path``: ``networks.load_network`` (the
    loader a ``<lora:..>`` prompt runs) keeps the modules it matched in ``.modules`` (each with the
    file's ``network_key`` and the layer, ``sd_module``) and drops the others with a debug log line."""
    networks = _networks_module()
    if networks is None or not hasattr(networks, "load_network"):
        raise HostLoaderMissing("its Lora extension (networks.load_network) is not loaded")
    net = networks.load_network(path.stem, _network_on_disk(networks, path))
    return HostMatch(
        {
            str(m.network_key).partition(".")[0]: HostLayer(
                str(m.sd_key), _a1111_layer_shape(m.sd_module, str(m.sd_key)), m.sd_module
            )
            for m in net.modules.values()
        }
    )


def _compute_device(unet: nn.Module) -> torch.device:
    """Where the host computes: ``modules.devices.device`` (under --medvram the UNet may sit on the CPU
    between calls), else where the UNet's weights are."""
    try:
        from modules import devices

        dev = getattr(devices, "device", None)
        if dev is not None:
            return torch.device(dev)
    except ImportError:
        pass
    return next(unet.parameters()).device


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _hf_text_encoder(sd_model: Any) -> nn.Module | None:
    """The Hugging Face CLIPTextModel inside A1111's CLIP wrapper (SD1); None for OpenCLIP (SD2)."""
    wrapped = getattr(getattr(sd_model, "cond_stage_model", None), "wrapped", None)
    te = getattr(wrapped, "transformer", None)
    if isinstance(te, nn.Module) and hasattr(te, "text_model"):
        return te
    return None


def _openclip_text_encoder(sd_model: Any) -> tuple[nn.Module, int] | None:
    """SD2's OpenCLIP text tower inside A1111's wrapper (ldm's ``FrozenOpenCLIPEmbedder`` at
    ``cond_stage_model.wrapped``: ``model`` the open_clip model) and the number of its blocks the host
    runs (``len(resblocks) - layer_idx``: 1 is the penultimate layer SD2 uses); None when it is not one."""
    wrapped = getattr(getattr(sd_model, "cond_stage_model", None), "wrapped", None)
    model = getattr(wrapped, "model", None)
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if not isinstance(model, nn.Module) or not isinstance(blocks, nn.ModuleList):
        return None
    return model, len(blocks) - int(getattr(wrapped, "layer_idx", 0) or 0)


def model_family(sd_model: Any) -> str:
    """``sd1``, ``sd2`` or ``sdxl``; a clear error for what the WebUI adapter cannot train."""
    for flag in ("is_sd3", "is_ssd"):
        if getattr(sd_model, flag, False):
            raise LoraTrainerError(
                f"The loaded model ({flag[3:].upper()}) cannot be trained here; load an SD1.x, SD2.x or SDXL checkpoint."
            )
    if getattr(sd_model, "is_sdxl", False):
        _SDXLConditioning.check(sd_model)
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    raise LoraTrainerError("The loaded model is not an SD1.x, SD2.x or SDXL checkpoint; load one to train a LoRA on it.")


SIZE_KEYS = {
    # sgm conditioner input key -> columns of our per-image sizes (orig h, w, crop top, left, target h, w)
    "original_size_as_tuple": slice(0, 2),
    "crop_coords_top_left": slice(2, 4),
    "target_size_as_tuple": slice(4, 6),
}


class _SDXLConditioning:
    """SDXL's conditioning as A1111 computes it, with gradients into text-encoder LoRAs.

    ``conditioner.embedders``: ``[0]`` A1111's CLIP-L wrapper (``wrapped.transformer`` a HF
    ``CLIPTextModel``), ``[1]`` its OpenCLIP wrapper (``wrapped.model`` the open_clip model, output
    ``(penultimate, pooled)``), then one size embedder per SIZE_KEYS entry."""

    def __init__(self, sd_model: Any, device: torch.device):
        self.check(sd_model)
        embedders = list(sd_model.conditioner.embedders)
        self.text = embedders[:2]
        self.sizes = [(e, SIZE_KEYS[e.input_key]) for e in embedders[2:]]
        self.te1: nn.Module = embedders[0].wrapped.transformer
        self.te2: nn.Module = embedders[1].wrapped.model
        self.conditioner: nn.Module = sd_model.conditioner
        self.device = device
        self.unet = sd_model.model.diffusion_model
        self.dtype = _param_dtype(self.unet)

    @staticmethod
    def check(sd_model: Any) -> None:
        """Refuse an SDXL-family model whose conditioning this adapter does not reproduce (the refiner,
        an SDXL with other embedders), before anything is changed."""
        embedders = list(getattr(getattr(sd_model, "conditioner", None), "embedders", None) or [])
        te1 = getattr(getattr(embedders[0], "wrapped", None), "transformer", None) if embedders else None
        te2 = getattr(getattr(embedders[1], "wrapped", None), "model", None) if len(embedders) > 1 else None
        keys = [getattr(e, "input_key", None) for e in embedders]
        if (
            len(embedders) < 3
            or not hasattr(te1, "text_model")
            or not hasattr(getattr(te2, "transformer", None), "resblocks")
            or keys[:2] != ["txt", "txt"]
            or any(k not in SIZE_KEYS for k in keys[2:])
        ):
            raise LoraTrainerError(
                "The loaded SDXL-type model is not an SDXL base model (CLIP-L + OpenCLIP bigG text encoders and "
                f"size conditioning; its conditioner has {keys}): an SDXL refiner cannot be trained here."
            )

    def encode_text(self, captions: list[str]) -> SDXLCond:
        """What ``conditioner(...)`` gives for ``txt`` (crossattn: CLIP-L then OpenCLIP states; the pooled
        OpenCLIP output), from the host's wrappers called directly: they have no ``no_grad``."""
        _host_move_in(self.conditioner)  # --medvram: its hook is on the conditioner, which this bypasses
        crossattn: list[torch.Tensor] = []
        vectors: list[torch.Tensor] = []
        for emb in self.text:
            out = emb(list(captions))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                (crossattn if o.dim() == 3 else vectors).append(o)
        if len(vectors) != 1:
            raise LoraTrainerError(f"the SDXL text encoders gave {len(vectors)} pooled outputs, expected 1")
        return SDXLCond(torch.cat(crossattn, dim=2).to(self.device), vectors[0].to(self.device))

    def vector(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's ``y``: the pooled text output, then each size embedder's embedding of its columns."""
        parts = [pooled.to(self.device)]
        for emb, cols in self.sizes:
            parts.append(emb(time_ids[:, cols].to(self.device)).to(self.device))
        return torch.cat([p.float() for p in parts], dim=1)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLCond) -> torch.Tensor:
        tids = cond.time_ids
        if tids is None:  # the square, uncropped size of the latents
            h, w = x_t.shape[-2] * 8, x_t.shape[-1] * 8
            tids = time_ids_from_sizes([(h, w, 0, 0, h, w)] * x_t.shape[0])
        if tids.shape[0] != x_t.shape[0]:
            raise ValueError(f"{tids.shape[0]} sizes for a batch of {x_t.shape[0]}")
        y = self.vector(cond.pooled, tids)
        # as A1111's apply_model: the conditioning in the UNet's dtype
        return self.unet(x_t, timesteps=t, context=cond.hidden.to(self.device, self.dtype), y=y.to(self.dtype))

    def text_encoder_targets(self) -> list[Target]:
        return find_targets(self.te1, "lora_te1", TEXT_CONTAINERS) + openclip_text_targets(self.te2, "lora_te2")


def _loaded_model() -> Any:
    shared = _shared()
    sd_model = getattr(shared, "sd_model", None)
    if sd_model is None or getattr(getattr(sd_model, "model", None), "diffusion_model", None) is None:
        raise LoraTrainerError("No checkpoint is loaded in the WebUI. Select one in the checkpoint list, then start again.")
    return sd_model


def _effective_mixed_precision(requested: str, weight_dtype: torch.dtype) -> str:
    """Half-precision host weights need autocast: without it ldm's fp32 timestep embedding meets fp16 layers."""
    if requested != "no":
        return requested
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight_dtype, "no")


@contextlib.contextmanager
def _temporary_option(opts: Any, key: str, value: Any) -> Iterator[bool]:
    """Set a host option for the duration of the run (in ``opts.data``, as the host reads it) and put the
    old value back. Yields False (and changes nothing) when the host has no such option."""
    data = getattr(opts, "data", None)
    labels = getattr(opts, "data_labels", None) or {}
    if not isinstance(data, dict) or (key not in data and key not in labels):
        yield False
        return
    had = key in data
    old = data.get(key)
    data[key] = value
    try:
        yield True
    finally:
        if had:
            data[key] = old
        else:
            data.pop(key, None)


def _lowvram_module() -> Any:
    try:
        from modules import lowvram
    except ImportError:  # Forge Neo, or no WebUI
        return None
    return lowvram


def _offloading_enabled(sd_model: Any) -> bool:
    """True when the host keeps parts of the model on the CPU (``--medvram``, ``--medvram-sdxl`` with
    SDXL loaded, ``--lowvram``): ``lowvram.is_enabled``, i.e. ``sd_model.lowvram``."""
    lowvram = _lowvram_module()
    if lowvram is None:
        return False
    is_enabled = getattr(lowvram, "is_enabled", None)
    try:
        return bool(is_enabled(sd_model)) if callable(is_enabled) else bool(getattr(sd_model, "lowvram", False))
    except Exception:  # noqa: BLE001 - an sd_model without the flag
        return bool(getattr(sd_model, "lowvram", False))


def check_offloading(sd_model: Any, shared: Any) -> None:
    """Refuse ``--lowvram`` before anything is changed (``--medvram`` / ``--medvram-sdxl`` are supported)."""
    if not _offloading_enabled(sd_model):
        return
    if getattr(getattr(shared, "cmd_opts", None), "lowvram", False):
        raise LoraTrainerError(
            "The WebUI was started with --lowvram, which keeps the UNet on the CPU and moves it to the GPU one block "
            "at a time; a LoRA training needs the whole UNet on the GPU through every backward pass, so it cannot run "
            "that way. Restart the WebUI with --medvram (or --medvram-sdxl) instead of --lowvram to train: the UNet "
            "then stays on the GPU while the training runs and goes back to the CPU afterwards."
        )


def _is_lowvram_hook(fn: Any, lowvram: Any) -> bool:
    """A forward pre-hook ``lowvram.setup_for_low_vram`` registered (its inner ``send_me_to_gpu``)."""
    module_name = getattr(lowvram, "__name__", "modules.lowvram")
    return getattr(fn, "__module__", None) == module_name or str(getattr(fn, "__qualname__", "")).endswith("send_me_to_gpu")


def _host_move_in(module: Any, lowvram: Any = None) -> None:
    """Under ``--medvram``: have the host move ``module``'s part to the GPU, as the part's own hook does
    when the part is called (the first module inside it with a lowvram hook: the VAE or SDXL's conditioner
    itself, SD1's CLIP transformer, SD2's open_clip model). Nothing without the host's offloading."""
    lowvram = lowvram or _lowvram_module()
    if lowvram is None or not isinstance(module, nn.Module):
        return
    for m in module.modules():
        for fn in list(m._forward_pre_hooks.values()):
            if _is_lowvram_hook(fn, lowvram):
                fn(m, ())
                return


class _Offloading:
    """``--medvram`` / ``--medvram-sdxl``: A1111's ``modules.lowvram`` keeps the UNet (``sd_model.model``), the
    text encoder(s) and the VAE on the CPU and moves one of them at a time to the GPU from forward pre-hooks
    (``send_me_to_gpu``: it first sends the part it moved last, ``lowvram.module_in_gpu``, back to the CPU);
    the VAE's hook also runs from its wrapped ``encode`` / ``decode``.

    Training calls the UNet directly (the hook on ``sd_model.model`` never fires) and needs it on the GPU
    through every backward pass, and through the text encoder's and the VAE's hooks in between. So for the
    run (:meth:`pin`) the UNet is moved in by its own host hook, is not left as ``module_in_gpu`` (no later
    hook sends it back), and its hook is taken off. The text encoder and the VAE keep theirs and are moved
    by the host as in a generation: the text encoder's fire inside the host's wrapper (SD1, SD2); where we
    call past the hooked module (SDXL's embedders, sgm's VAE encoder) :func:`_host_move_in` fires them
    first. Within a step nothing moves the text encoder out between its forward and the backward (the VAE
    encodes before it, for latents that are not cached). :meth:`release` puts
    the hook back, has the host send the parts to the CPU, and moves in again the part that was in before:
    the placement is as it was. :meth:`suspended` gives the host its own placement for a generation in the
    middle of the run (a grid column)."""

    def __init__(self, lowvram: Any, roots: list[nn.Module]):
        self.lowvram = lowvram
        self.roots = roots
        self.units: list[nn.Module] = []
        self._saved_hooks: list[tuple[nn.Module, list[tuple[int, Any]]]] = []
        self._before: Any = None
        self._started = False
        self._pinned = False

    @classmethod
    def for_model(cls, sd_model: Any, roots: list[nn.Module]) -> _Offloading | None:
        if not _offloading_enabled(sd_model):
            return None
        lowvram = _lowvram_module()
        if not callable(getattr(lowvram, "send_everything_to_cpu", None)) or not hasattr(lowvram, "module_in_gpu"):
            raise LoraTrainerError(
                "The WebUI keeps the model on the CPU between uses (--medvram) in a way this adapter does not know "
                "(no lowvram.send_everything_to_cpu / module_in_gpu); restart the WebUI without --medvram / "
                "--medvram-sdxl to train."
            )
        return cls(lowvram, roots)

    def pin(self) -> None:
        lv = self.lowvram
        if self._pinned:
            return
        self._pinned = True
        if not self._started:
            self._started = True
            self._before = lv.module_in_gpu
        lv.send_everything_to_cpu()
        try:
            for root in self.roots:
                for m in list(root.modules()):
                    hooks = m._forward_pre_hooks
                    mine = [(k, fn) for k, fn in hooks.items() if _is_lowvram_hook(fn, lv)]
                    if not mine:
                        continue
                    mine[0][1](m, ())  # the host's own move
                    unit = lv.module_in_gpu
                    if unit is not None and not any(u is unit for u in self.units):
                        self.units.append(unit)
                    lv.module_in_gpu = None  # nothing the host does next sends it back to the CPU
                    self._saved_hooks.append((m, list(hooks.items())))
                    for k, _ in mine:
                        del hooks[k]
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            raise LoraTrainerError(
                f"--medvram: the UNet does not fit on the GPU for the training ({e}). Free GPU memory (other programs, "
                "other models) and start again."
            ) from e

    def unpin(self) -> None:
        """The hooks back; every part the run moved in goes back to the CPU through the host's function."""
        lv = self.lowvram
        if not self._pinned:
            return
        self._pinned = False
        while self._saved_hooks:
            m, saved = self._saved_hooks.pop()
            hooks = m._forward_pre_hooks
            added = [(k, fn) for k, fn in hooks.items() if all(k != key for key, _ in saved)]
            hooks.clear()
            hooks.update(saved)
            hooks.update(added)
        lv.send_everything_to_cpu()
        for unit in self.units:
            lv.module_in_gpu = unit
            lv.send_everything_to_cpu()
        self.units = []

    def release(self) -> None:
        """:meth:`unpin`, then the part that was on the GPU before the run is moved in again by its hook."""
        if not self._started:
            return
        self.unpin()
        before, self._before = self._before, None
        self._started = False
        _host_move_in(before, self.lowvram)
        try:
            from modules import devices

            torch_gc = getattr(devices, "torch_gc", None)
            if callable(torch_gc):
                torch_gc()  # as the host after a generation: give the freed GPU memory back
        except ImportError:
            pass

    def evict(self) -> None:
        """The host's ``send_everything_to_cpu``: the part its hooks moved in last goes back to the CPU (the
        pinned UNet is not the host's ``module_in_gpu`` and stays)."""
        self.lowvram.send_everything_to_cpu()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The host's own placement (its hooks, the parts on the CPU) for a generation in the middle of the run."""
        self.unpin()
        try:
            yield
        finally:
            self.pin()


class _HostModelState:
    """What training changes on the host's modules, and how to put it back (called by ``bundle.release``)."""

    def __init__(self, unet: nn.Module, others: list[nn.Module], offload: _Offloading | None = None):
        self.offload = offload
        self.unet = unet
        self.modes = [(m, m.training) for m in [unet, *others]]
        self.ldm_flags: list[tuple[nn.Module, str, bool]] = []
        self._undo_checkpointing = None
        for m in unet.modules():
            for attr in ("use_checkpoint", "checkpoint"):
                v = m.__dict__.get(attr)
                if isinstance(v, bool) and v:
                    self.ldm_flags.append((m, attr, v))

    def prepare(self) -> None:
        if self.offload is not None:
            self.offload.pin()
        for m, _ in self.modes:
            m.eval()
        # ldm's CheckpointFunction differentiates only w.r.t. a block's inputs and own parameters:
        # our LoRA weights live outside the block and would get no gradient at all.
        for m, attr, _ in self.ldm_flags:
            setattr(m, attr, False)

    def gradient_checkpointing(self, on: bool) -> None:
        if on and self._undo_checkpointing is None:
            self._undo_checkpointing = checkpoint_ldm_unet_blocks(self.unet)
        elif not on and self._undo_checkpointing is not None:
            self._undo_checkpointing()
            self._undo_checkpointing = None

    def restore(self) -> None:
        self.gradient_checkpointing(False)
        for m, attr, v in self.ldm_flags:
            setattr(m, attr, v)
        for m, mode in self.modes:
            m.train(mode)
        if self.offload is not None:
            self.offload.release()


class A1111Host:
    name = "a1111"

    # -- model ---------------------------------------------------------------------
    def model_bundle(self, cfg: TrainConfig, runtime: Runtime) -> ModelBundle:
        """The loaded checkpoint as a bundle. Host LoRAs are cleared from the weights first; call
        ``bundle.release()`` when done (``run`` does)."""
        return self._model_bundle(cfg, runtime)[0]

    def _model_bundle(self, cfg: TrainConfig, runtime: Runtime) -> tuple[ModelBundle, _HostModelState]:
        from ..model.ldm import ldm_unet_lora_targets
        from ..model.sd import module_fingerprint

        sd_model = _loaded_model()
        family = model_family(sd_model)
        check_offloading(sd_model, _shared())
        unet: nn.Module = sd_model.model.diffusion_model
        in_ch = getattr(unet, "in_channels", 4)
        if in_ch != 4:
            raise LoraTrainerError(
                f"The loaded checkpoint's UNet takes {in_ch} input channels (an inpainting or instruct model); "
                "load a plain SD1.x/SD2.x/SDXL checkpoint to train a LoRA."
            )
        vae: nn.Module = sd_model.first_stage_model
        device = runtime.device
        dtype = _param_dtype(unet)
        vae_dtype = _param_dtype(vae)
        xl = _SDXLConditioning(sd_model, device) if family == "sdxl" else None
        text_root = sd_model.conditioner if xl is not None else sd_model.cond_stage_model

        offload = _Offloading.for_model(sd_model, [sd_model.model])  # the UNet; the rest moves as in a generation
        state = _HostModelState(unet, [m for m in (text_root, vae) if isinstance(m, nn.Module)], offload)
        try:
            state.prepare()
            self.clear_host_loras(sd_model, device)
            _host_move_in(vae)  # --medvram: read (fingerprint) and used (latents) next
        except Exception:
            state.restore()
            raise

        if cfg.prediction_type == "auto":
            prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        else:
            prediction_type = cfg.prediction_type

        info = getattr(sd_model, "sd_checkpoint_info", None)
        vae_file = _loaded_vae_file()
        vae_name = os.path.basename(vae_file) if vae_file else ""
        common: dict[str, Any] = dict(
            family=family,
            prediction_type=prediction_type,
            alphas_cumprod=sd_model.alphas_cumprod.detach().to("cpu", torch.float32).clone(),
            device=device,
            dtype=dtype,
            model_name=str(getattr(info, "title", "") or getattr(info, "model_name", "") or ""),
            model_hash=getattr(info, "sha256", None) or None,
            vae_name=vae_name,
            vae_id=f"{vae_name}:{module_fingerprint(vae)}",
            enable_gradient_checkpointing=state.gradient_checkpointing,
            release=state.restore,
        )

        if xl is not None:

            @torch.no_grad()
            def encode_images_xl(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
                _host_move_in(vae)  # --medvram: the host's wrapped encode would; ours calls the encoder itself
                return _encode_sgm_vae(vae, pixels.to(device, vae_dtype), generator, float(sd_model.scale_factor))

            def condition(cond: SDXLCond, sizes: list[tuple[int, ...]] | None) -> SDXLCond:
                if sizes is None:
                    return cond
                tids = time_ids_from_sizes(sizes)
                if tids.shape[0] != cond.hidden.shape[0]:
                    raise ValueError(f"{tids.shape[0]} sizes for a batch of {cond.hidden.shape[0]}")
                return SDXLCond(cond.hidden, cond.pooled, tids)

            def unet_targets_xl(include_conv: bool) -> list[Target]:
                # kohya's SDXL keys are the SGM module paths themselves: no name map
                conv = UNET_CONV_CONTAINERS if include_conv else frozenset()
                return find_targets(unet, "lora_unet", UNET_ATTENTION_CONTAINERS, conv)

            return ModelBundle(
                **common,
                encode_images=encode_images_xl,
                encode_text=xl.encode_text,
                predict=xl.predict,
                unet_targets=unet_targets_xl,
                text_encoder_targets=xl.text_encoder_targets,
                trainable_roots=[unet, xl.te1, xl.te2],
                default_resolution=1024,
                condition=condition,
                concat_conditions=SDXLCond.cat,
            ), state

        te = _hf_text_encoder(sd_model)
        openclip = _openclip_text_encoder(sd_model) if te is None else None

        @torch.no_grad()
        def encode_images(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            posterior = sd_model.encode_first_stage(pixels.to(device, vae_dtype))
            mean = getattr(posterior, "mean", None)
            std = getattr(posterior, "std", None)
            if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
                # a DiagonalGaussianDistribution: sample with our generator (or take the mean), not the global RNG
                if generator is None:
                    posterior = mean
                else:
                    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
                    posterior = mean + std * noise
            latents = sd_model.get_first_stage_encoding(posterior)
            return latents.detach().float().clone()

        def encode_text(captions: list[str]) -> torch.Tensor:
            cond = sd_model.cond_stage_model(list(captions))
            if isinstance(cond, (tuple, list)):
                cond = cond[0]
            return cond.to(device)

        def predict(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return unet(x_t, t, context=cond)

        def unet_targets(include_conv: bool) -> list[Target]:
            return ldm_unet_lora_targets(unet, include_conv)

        def text_encoder_targets() -> list[Target]:
            if te is not None:
                return find_targets(te, "lora_te", TEXT_CONTAINERS)
            if openclip is not None:  # SD2: kohya's names for the blocks the host runs
                return openclip_text_targets(openclip[0], "lora_te", num_layers=openclip[1])
            return []

        te_root = te if te is not None else (openclip[0] if openclip is not None else None)
        return ModelBundle(
            **common,
            encode_images=encode_images,
            encode_text=encode_text,
            predict=predict,
            unet_targets=unet_targets,
            text_encoder_targets=text_encoder_targets,
            trainable_roots=[unet] + ([te_root] if te_root is not None else []),
            default_resolution=768 if family == "sd2" and prediction_type == "v_prediction" else 512,
        ), state

    def clear_host_loras(self, sd_model: Any, device: torch.device | None = None) -> bool:
        """Take the host's merged ``<lora:..>`` weights out of the model: empty ``networks.loaded_networks``,
        then one forward without grad through the text encoders and the UNet, in which A1111's patched
        layer forwards copy their clean backups back. Returns False when the Lora extension is absent."""
        networks = _networks_module()
        if networks is None:
            return False
        loaded = getattr(networks, "loaded_networks", None)
        if loaded is not None:
            loaded.clear()
        unet = sd_model.model.diffusion_model
        device = device or _compute_device(unet)
        dtype = _param_dtype(unet)
        autocast = (
            torch.autocast(device.type, dtype=dtype) if dtype in (torch.float16, torch.bfloat16) else contextlib.nullcontext()
        )
        x = torch.zeros(1, getattr(unet, "in_channels", 4), 8, 8, device=device, dtype=dtype)
        t = torch.zeros(1, dtype=torch.long, device=device)
        with torch.no_grad(), autocast:
            if getattr(sd_model, "is_sdxl", False):
                xl = _SDXLConditioning(sd_model, device)
                xl.predict(x, t, xl.encode_text([""]))
            else:
                cond = sd_model.cond_stage_model([""])
                if isinstance(cond, (tuple, list)):
                    cond = cond[0]
                unet(x, t, context=cond.to(device))
        return True

    # -- files ---------------------------------------------------------------------
    def lora_dir(self, cfg: TrainConfig | None = None) -> Path:
        """The host's LoRA folder (``--lora-dir``, default models/Lora), plus the sub-folder from the settings."""
        return webui_lora_dir(_shared())

    def refresh_loras(self) -> None:
        rescan_loras(_networks_module())

    # -- a run -----------------------------------------------------------------------
    def run(self, cfg: TrainConfig, events: EventBus, stop: StopControl) -> None:
        """One training run on the loaded checkpoint, with generation locked out for its whole length."""
        from modules import call_queue

        from ..api import check_output_inside
        from ..train.loop import preflight, train

        shared = _shared()
        folder = self.lora_dir(cfg)
        cfg = replace(cfg, output_dir=str(folder))  # files only ever go to the host's LoRA folder
        cfg.validate()
        check_output_inside(folder, cfg.output_name)
        scan = preflight(cfg, events)
        folder.mkdir(parents=True, exist_ok=True)

        lock = call_queue.queue_lock
        if not acquire_queue_lock(lock, events, stop):
            return
        try:
            result = self._run_locked(cfg, scan, events, stop, shared, train)
            self.refresh_loras()
            if (
                result is not None
                and result.files
                and not stop.requested
                and cfg.grid_after_training
                and not cfg.grid_each_epoch  # that grid grew with the epochs
                and bool(getattr(shared.opts, "lora_trainer_grid_after_training", True))
            ):
                grid_after_training_in_host(shared, cfg, result, scan, events, stop, A1111Generator())
        finally:
            lock.release()

    def build_grid(self, cfg: TrainConfig, files: list[str], events: EventBus, stop: StopControl) -> None:
        """The "Build grid" button, through the host's txt2img."""
        _loaded_model()
        build_grid_locked(_shared(), cfg, files, events, stop, A1111Generator(), self.refresh_loras)

    def _growing_grid(self, cfg: TrainConfig, scan, bus: EventBus, stop: StopControl, sd_model, mirror):
        """``after_save`` for ``grid_each_epoch``: the new epoch's column through the host's txt2img,
        with the training LoRA switched off; the host's LoRA is taken out of the weights again
        before training goes on. A failed column is reported, never fatal."""
        from ..grid import GrowingGrid
        from ..world.sample import lora_weight

        growing = GrowingGrid(cfg, A1111Generator(), bus, stop, scan.trigger_word)
        bus.subscribe(growing)

        def after_save(path, network) -> None:
            self.refresh_loras()
            mirror.restore_vae()  # generation decodes with the VAE
            offload = mirror.offload
            try:
                # --medvram: the host's own placement (its hooks, the parts on the CPU) while it generates
                with lora_weight(network, 0.0), offload.suspended() if offload is not None else contextlib.nullcontext():
                    growing.add_column(path)
            except Exception as e:  # noqa: BLE001 - the file is saved; training goes on
                bus.warning(f"the grid column for {Path(path).name} could not be made ({type(e).__name__}: {e})")
            finally:
                self.clear_host_loras(sd_model)
                mirror.unload_again()

        return after_save

    def _run_locked(self, cfg: TrainConfig, scan, events: EventBus, stop: StopControl, shared, train):
        state = shared.state
        state.begin(job=JOB_NAME)
        mirror = _StateMirror(self, state, stop, shared)
        bus = EventBus(mirror, events.emit)  # the host state first: listeners see it current
        try:
            sd_model = _loaded_model()
            family = model_family(sd_model)
            check_offloading(sd_model, shared)  # --lowvram: refused before anything is changed
            if (
                family != "sdxl"
                and cfg.train_text_encoder
                and _hf_text_encoder(sd_model) is None
                and _openclip_text_encoder(sd_model) is None
            ):
                kind = type(getattr(getattr(sd_model, "cond_stage_model", None), "wrapped", None)).__name__
                events.warning(f"the loaded model's text encoder ({kind}) cannot take a LoRA here: training the UNet only")
                cfg = replace(cfg, train_text_encoder=False)
            unet = sd_model.model.diffusion_model
            device = _compute_device(unet)
            weight_dtype = _param_dtype(unet)
            mixed = _effective_mixed_precision(cfg.mixed_precision, weight_dtype)
            if mixed != cfg.mixed_precision:
                events.info(f"the loaded weights are {str(weight_dtype).replace('torch.', '')}: computing with mixed_precision {mixed}")
            runtime = Runtime(device, mixed)
            if cfg.attention != "sdpa":
                events.info("attention: the WebUI's own cross-attention optimization is used (Settings > Optimizations)")
            info = getattr(sd_model, "sd_checkpoint_info", None)
            events.info(f"base model: the loaded checkpoint {getattr(info, 'title', '') or '(unnamed)'}")
            mirror.unload_vae = bool(getattr(shared.opts, "lora_trainer_unload_unused", False)) and cfg.cache_latents
            mirror.sd_model = sd_model
            skip: Any = contextlib.nullcontext(True)
            if family == "sdxl":
                # SDXL takes its encoders' layers from the host's SDXL settings, in training as in generation
                if cfg.clip_skip != 1:
                    events.info("SDXL: clip_skip is not used; the text encoders' layers follow the WebUI's SDXL settings")
            elif family == "sd2" and _hf_text_encoder(sd_model) is None:
                # A1111 encodes SD2 prompts with the OpenCLIP layer of the model's config (the penultimate) and
                # ignores its Clip skip option; kohya's SD2 files call that clip_skip 1
                if cfg.clip_skip != 1:
                    events.info(
                        "SD2: clip_skip is not used; the WebUI encodes SD2 prompts with the penultimate OpenCLIP layer "
                        "(clip_skip 1 in kohya's terms)"
                    )
                    cfg = replace(cfg, clip_skip=1)
            else:
                skip = _temporary_option(shared.opts, CLIP_SKIP_OPTION, cfg.clip_skip)
            bundle, host_state = self._model_bundle(cfg, runtime)
            mirror.offload = host_state.offload
            mirror.evict_text_at_first_step = cfg.cache_text_encoder_outputs
            if host_state.offload is not None:
                events.info(
                    "--medvram: the UNet stays on the GPU while the training runs and goes back to the CPU afterwards; "
                    "the WebUI moves the text encoder and the VAE in when they are used, as in a generation"
                )
            try:
                with skip as set_skip:
                    if not set_skip and cfg.clip_skip != 1:
                        events.warning("this WebUI has no Clip skip option: clip_skip is ignored")
                    grid = self._growing_grid(cfg, scan, bus, stop, sd_model, mirror) if cfg.grid_each_epoch else None
                    after_save = checked_after_save(HostKeyCheck("A1111", a1111_key_match, bus), grid)
                    return train(cfg, bundle, bus, stop, runtime=runtime, scan=scan, after_save=after_save)
            finally:
                bundle.release()
                mirror.restore_vae()
        finally:
            mirror.active = False
            state.end()


class A1111Generator:
    """``generate(cell)`` for the grid: one txt2img through ``modules.processing``, as the UI does it.
    The caller holds the queue lock; the training LoRA's hooks are already removed."""

    def __call__(self, cell):
        return txt2img_cell(cell)


def _encode_sgm_vae(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator | None, scale: float) -> torch.Tensor:
    """Scaled latents from an sgm/ldm ``AutoencoderKL``: the posterior's mean, or a sample drawn with
    ``generator`` (sgm's ``encode`` samples with the global RNG, so the encoder is called directly)."""
    moments = vae.quant_conv(vae.encoder(pixels))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    if generator is None:
        z = mean
    else:
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))  # as DiagonalGaussianDistribution
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
        z = mean + std * noise
    latents = (scale * z).detach().float()
    return finite_latents(latents, mean.dtype, "start the WebUI with --no-half-vae").clone()


def _loaded_vae_file() -> str | None:
    try:
        from modules import sd_vae
    except ImportError:
        return None
    f = getattr(sd_vae, "loaded_vae_file", None)
    return str(f) if f else None


class _StateMirror:
    """Event listener: progress into ``shared.state``, the host's Interrupt into a stop, the LoRA list
    refreshed after each saved file, and (setting ``lora_trainer_unload_unused``) the VAE moved to the CPU
    once every latent is cached."""

    def __init__(self, host: A1111Host, state: Any, stop: StopControl, shared: Any):
        self.host = host
        self.state = state
        self.stop = stop
        self.shared = shared
        self.active = True
        self.unload_vae = False
        self.sd_model: Any = None
        self.offload: _Offloading | None = None
        self.evict_text_at_first_step = False
        self._vae_device: torch.device | None = None

    def __call__(self, ev: Event) -> None:
        if not self.active:
            return
        st = self.state
        if getattr(st, "interrupted", False) and not self.stop.requested:
            self.stop.stop(False)
        elif getattr(st, "stopping_generation", False) and not self.stop.requested:
            self.stop.stop(True)  # "stop generating": finish with what is there, saved
        if isinstance(ev, TrainingStarted):
            st.job_count = ev.total_steps
            st.job_no = 0
            st.sampling_step = 0
            st.sampling_steps = 0
            st.textinfo = f"LoRA training: {ev.total_steps} steps, {ev.epochs} epochs"
        elif isinstance(ev, CachingProgress):
            st.sampling_step = ev.done
            st.sampling_steps = ev.total
            st.textinfo = f"LoRA training: caching latents {ev.done}/{ev.total}"
            if ev.done >= ev.total:
                st.sampling_step = st.sampling_steps = 0
                self._maybe_unload_vae()
        elif isinstance(ev, StepEvent):
            if self.offload is not None and self.evict_text_at_first_step and ev.step == 1:
                self.offload.evict()  # --medvram: the text encoder's outputs are cached, it is not needed on the GPU
            st.job_count = ev.total_steps
            st.job_no = ev.step
            eta = f", ETA {int(ev.eta) // 60}:{int(ev.eta) % 60:02d}" if ev.eta else ""
            st.textinfo = (
                f"LoRA training: step {ev.step}/{ev.total_steps}, epoch {ev.epoch}, "
                f"loss {ev.loss:.4f} (average {ev.loss_average:.4f}){eta}"
            )
        elif isinstance(ev, FileSaved):
            self.host.refresh_loras()
            st.textinfo = f"LoRA training: saved {Path(ev.path).name}"

    def _maybe_unload_vae(self) -> None:
        if self.offload is not None:
            # --medvram: the host moved the VAE in to encode the images; with every latent cached it goes back
            # to the CPU through the host's own function (the pinned UNet stays)
            self.offload.evict()
            return
        if not self.unload_vae or self.sd_model is None or self._vae_device is not None:
            return
        cmd = getattr(self.shared, "cmd_opts", None)
        if getattr(cmd, "medvram", False) or getattr(cmd, "lowvram", False):
            return  # the host moves models itself
        vae = getattr(self.sd_model, "first_stage_model", None)
        if not isinstance(vae, nn.Module):
            return
        dev = next(vae.parameters()).device
        if dev.type == "cpu":
            return
        vae.to("cpu")
        self._vae_device = dev
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def unload_again(self) -> None:
        """After a grid column: back to the CPU if the VAE was there (the latents are all cached)."""
        self._maybe_unload_vae()

    def restore_vae(self) -> None:
        if self._vae_device is not None and self.sd_model is not None:
            self.sd_model.first_stage_model.to(self._vae_device)
            self._vae_device = None
