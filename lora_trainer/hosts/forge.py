"""The Forge host (Forge-2: lllyasviel/stable-diffusion-webui-forge main, Forge Neo).

Trains on the model Forge already holds (``shared.sd_model.forge_objects``): no second copy and
no reload. Every Forge import happens inside a function, so this module imports without Forge.

Forge differs from A1111 in ways that break a naive training loop. Each is handled by one small
function below, tested on its own (tests/test_host_forge.py):

(a) :func:`detach_inference_tensors`: Forge loads weights under ``torch.inference_mode()``;
    autograd refuses them until every parameter and buffer is a normal tensor again.
(b) :func:`guard_inplace_residuals`: Forge's UNet adds residuals in place (``x += n``) after a
    LayerNorm saved ``x`` for backward; cloning each LayerNorm's input makes backward correct.
    (Non-reentrant activation checkpointing alone does *not* fix this: it recomputes the same
    in-place adds and silently gives wrong gradients; see the tests.)
(c) Forge's ``Linear`` is not ``torch.nn.Linear``: our forward-hook LoRA needs only ``weight``
    and the module call, so it attaches unchanged (``network.targets.is_linear``).
(d) :func:`restore_clean_weights`: LoRAs of the last generation stay merged in the weights until
    Forge loads the LoRA-free patchers again.
(e) :class:`_Placement`: latents are encoded first; the UNet and the text encoder are then loaded
    once with Forge's memory manager, which is not called again while the loop runs (a VAE load
    in between would evict the UNet; the host forces ``cache_latents`` for that reason).
(f) :class:`ForgeGenerator`: the grid (after training, the Build grid button, or a column per
    epoch) goes through Forge's own txt2img on Forge's main thread. A generation in the middle of a
    run leaves Forge's LoRA merged and its own clip skip set: :meth:`ForgeHost._growing_grid` puts
    the clean weights, the training clip skip and the placement back before training goes on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import LoraTrainerError
from ..model.bundle import ModelBundle
from ..model.ldm import checkpoint_ldm_unet_blocks, ldm_unet_blocks
from ..model.sdxl import SDXLCond, time_ids_from_sizes
from ..network.targets import (
    TEXT_CONTAINERS,
    UNET_ATTENTION_CONTAINERS,
    UNET_CONV_CONTAINERS,
    Target,
    find_targets,
)
from ..train.events import (
    CachingProgress,
    Event,
    EventBus,
    FileSaved,
    StepEvent,
    StopControl,
    TrainingStarted,
)
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

JOB_NAME = "lora_trainer"
TRAINABLE_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
_TEXT_ENCODER_KEYS = {"sd1": "clip_l", "sd2": "clip_h"}
# Forge's load_lora_for_models applies nothing of a file with more unmatched keys than this, and
# nothing of its UNet (or text encoder) part when more of that part's keys miss the model's weights
FORGE_UNMATCHED_LIMIT = 12


# ------------------------------------------------------------------------- (a) inference tensors
def _needs_copy(t: torch.Tensor) -> bool:
    """An inference tensor, or a former one whose ``.data`` was swapped outside inference mode
    (it then reports ``is_inference() == False`` but has no version counter, and the next
    inference-mode forward fails with "Inference tensors do not track version counter")."""
    if t.is_inference():
        return True
    try:
        t._version  # noqa: B018 - the access itself is the test
    except RuntimeError:
        return True
    return False


def _normal_copy(t: torch.Tensor) -> torch.Tensor:
    data = t.detach().clone()  # outside inference mode: a normal tensor with a version counter
    if isinstance(t, nn.Parameter):
        if type(t) is not nn.Parameter:
            raise LoraTrainerError(
                f"A {type(t).__name__} weight (quantized storage) cannot be trained. Load the checkpoint "
                "with fp16, bf16 or fp32 weights (Forge's 'Diffusion in Low Bits' set to Automatic)."
            )
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def detach_inference_tensors(module: nn.Module) -> int:
    """Replace, in place, every inference-mode parameter and buffer of ``module`` by a normal copy.

    The module objects stay where they are (hooks, patchers and LoRA targets keep working); only
    the tensors in their ``_parameters`` / ``_buffers`` slots change. Every slot is visited, also a
    second reference to the same tensor (``remove_duplicate=False``: Forge's textual-inversion
    wrapper holds the token embedding's weight a second time), and all slots that held one old
    tensor receive the same new one, so sharing is kept. A parameter keeps its ``requires_grad``.
    Values are copied bit for bit. Returns how many distinct tensors were replaced (0 when there
    was nothing to do, so calling it again is cheap)."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old kept alive, new)
    with torch.inference_mode(False), torch.no_grad():
        for _, owner in module.named_modules(remove_duplicate=False):
            for slots in (owner._parameters, owner._buffers):
                for name, t in list(slots.items()):
                    if t is None:
                        continue
                    hit = done.get(id(t))
                    if hit is not None and hit[0] is t:
                        slots[name] = hit[1]
                        continue
                    if not _needs_copy(t):
                        continue
                    new = _normal_copy(t)
                    done[id(t)] = (t, new)
                    slots[name] = new
    return len(done)


# ------------------------------------------------------------------- (b) in-place residual adds
def _clone_first_input(module: nn.Module, args: tuple) -> tuple | None:
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (args[0].clone(),) + tuple(args[1:])


class _Undo:
    def __init__(self, fns: Iterable[Callable[[], None]]):
        self._fns = list(fns)

    def __call__(self) -> None:
        fns, self._fns = self._fns, []
        for fn in reversed(fns):
            fn()


def guard_inplace_residuals(unet: nn.Module) -> Callable[[], None]:
    """Make backward through Forge's UNet correct despite its in-place residual adds.

    ``backend/nn/unet.py`` computes ``n = norm1(x); ...; x += n``: LayerNorm saved ``x`` for its
    backward and the in-place add changes it, so backward raises "one of the variables needed for
    gradient computation has been modified by an inplace operation". A forward pre-hook on every
    LayerNorm hands it a clone of its input while grad is enabled: the saved tensor is the clone,
    the add changes only the original. Gradients are exact; the extra memory is one activation
    per LayerNorm call, what an out-of-place add would have kept anyway. No-grad forwards are
    untouched. Returns a function that removes the hooks."""
    handles = [m.register_forward_pre_hook(_clone_first_input) for m in unet.modules() if isinstance(m, nn.LayerNorm)]
    return _Undo(h.remove for h in handles)


# Activation checkpointing of the LDM blocks is shared with the A1111 adapter (model/ldm.py);
# with Forge use it together with guard_inplace_residuals (the recomputation repeats the in-place adds).
unet_blocks = ldm_unet_blocks
checkpoint_unet_blocks = checkpoint_ldm_unet_blocks


# ----------------------------------------------------------------------- (d) host LoRAs merged
def restore_clean_weights(sd_model: Any, load_models: Callable[[list], Any]) -> None:
    """Undo the LoRAs the last generation merged into the weights, and forget that they were applied.

    Forge keeps a ``<lora:...>`` merged in the shared weights after a generation; loading the
    LoRA-free patchers of ``forge_objects_original`` through ``load_models`` (Forge's
    ``memory_management.load_models_gpu``) puts the backed-up weights back. The LoRA bookkeeping is
    then reset to "no LoRA" (``forge_objects`` and ``forge_objects_after_applying_lora`` to the
    original patchers, ``current_lora_hash`` to ``str([])``), so the next generation applies its
    own LoRAs again instead of reusing the patched clones (which would re-merge the old LoRA)."""
    original = sd_model.forge_objects_original
    patchers = [original.unet]
    clip = getattr(original, "clip", None)
    if clip is not None and getattr(clip, "patcher", None) is not None:
        patchers.append(clip.patcher)
    load_models(patchers)
    sd_model.forge_objects = original.shallow_copy()
    if hasattr(sd_model, "forge_objects_after_applying_lora"):
        sd_model.forge_objects_after_applying_lora = original.shallow_copy()
    sd_model.current_lora_hash = str([])


# -------------------------------------------------------------------------------- model access
def forge_family(sd_model: Any) -> str:
    """``sd1``, ``sd2`` or ``sdxl``; a clear error for every other model Forge can hold."""
    if getattr(sd_model, "is_sdxl", False):
        _ForgeSDXL.check(sd_model)
        return "sdxl"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    kind = type(sd_model).__name__
    raise LoraTrainerError(
        f"The loaded model ({kind}) is not Stable Diffusion 1.x, 2.x or SDXL; only those can be trained on Forge. "
        "Select an SD1.5 or SDXL checkpoint in Forge's checkpoint list."
    )


class _ForgeSDXL:
    """SDXL's conditioning as Forge computes it (``backend/diffusion_engine/sdxl.py``), with gradients
    into text-encoder LoRAs.

    Forge holds CLIP-L and OpenCLIP bigG as HF ``CLIPTextModel``s (``clip.cond_stage_model.clip_l`` /
    ``clip_g``, each ``.transformer``; bigG with separate q/k/v and a ``text_projection`` Linear added).
    Its text engines ``text_processing_engine_l`` / ``_g`` are not inference-mode (only
    ``get_learned_conditioning`` is): ``crossattn`` is both engines' states concatenated, CLIP-L first;
    the UNet's ``y`` is bigG's projected pooled output, then ``sd_model.embedder`` (a sinusoidal
    timestep embedding) of original height, width, crop top, crop left, target height, width, in the
    pooled output's dtype. kohya names: ``lora_te1_`` / ``lora_te2_`` + HF module paths."""

    def __init__(self, sd_model: Any, cond_model: nn.Module, device: torch.device, compute_dtype: torch.dtype):
        self.check(sd_model)
        self.te1: nn.Module = cond_model.clip_l.transformer
        self.te2: nn.Module = cond_model.clip_g.transformer
        self.engine_l = sd_model.text_processing_engine_l
        self.engine_g = sd_model.text_processing_engine_g
        self.embedder = sd_model.embedder
        self.device = device
        self.dtype = compute_dtype

    @staticmethod
    def check(sd_model: Any) -> None:
        """Refuse an SDXL-type model this adapter does not reproduce (Forge's SDXL refiner: CLIP-G only,
        an aesthetic score in ``y``), before anything is changed."""
        cond = getattr(getattr(getattr(sd_model, "forge_objects", None), "clip", None), "cond_stage_model", None)
        parts = [getattr(getattr(cond, k, None), "transformer", None) for k in ("clip_l", "clip_g")]
        engines = [getattr(sd_model, k, None) for k in ("text_processing_engine_l", "text_processing_engine_g")]
        if (
            any(p is None for p in parts)
            or any(e is None for e in engines)
            or getattr(sd_model, "embedder", None) is None
        ):
            raise LoraTrainerError(
                f"The loaded SDXL-type model ({type(sd_model).__name__}) is not an SDXL base model (CLIP-L + "
                "OpenCLIP bigG text encoders and size conditioning): an SDXL refiner cannot be trained here."
            )

    @property
    def engines(self) -> list[Any]:
        return [self.engine_l, self.engine_g]

    def encode_text(self, captions: list[str]) -> SDXLCond:
        cond_l = self.engine_l(list(captions))
        out_g = self.engine_g(list(captions))
        if not isinstance(out_g, (tuple, list)) or len(out_g) != 2:
            raise LoraTrainerError(
                "Forge's CLIP-G text engine gave no pooled output; this Forge version is not supported."
            )
        cond_g, pooled = out_g
        hidden = torch.cat([cond_l, cond_g.to(cond_l.dtype)], dim=2)
        return SDXLCond(hidden.to(self.device), pooled.to(self.device))

    def vector(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's ``y``: pooled output, then the embedding of each size value (6 per image)."""
        b = time_ids.shape[0]
        flat = self.embedder(time_ids.reshape(-1).float()).reshape(b, -1)
        return torch.cat([pooled, flat.to(pooled)], dim=1)

    def text_encoder_targets(self) -> list[Target]:
        return find_targets(self.te1, "lora_te1", TEXT_CONTAINERS) + find_targets(self.te2, "lora_te2", TEXT_CONTAINERS)


def noise_schedule(predictor: Any, prediction_type: str = "auto") -> tuple[str, torch.Tensor]:
    """(prediction type, alphas_cumprod float32 on CPU) from Forge's k-diffusion predictor."""
    ptype = prediction_type if prediction_type != "auto" else str(getattr(predictor, "prediction_type", "epsilon"))
    if ptype not in ("epsilon", "v_prediction"):
        raise LoraTrainerError(
            f"The loaded model predicts {ptype!r}; only epsilon and v_prediction models can be trained."
        )
    ac = getattr(predictor, "alphas_cumprod", None)
    with torch.inference_mode(False):
        if ac is None:
            sigmas = getattr(predictor, "sigmas", None)
            if sigmas is None:
                raise LoraTrainerError(
                    "The loaded model has no discrete noise schedule (alphas_cumprod); it cannot be trained."
                )
            ac = 1.0 / (1.0 + sigmas.detach().double() ** 2)
        ac = ac.detach().to("cpu", torch.float32).clone()
    return ptype, ac


def _compute_dtype(unet: nn.Module) -> torch.dtype:
    dt = getattr(unet, "computation_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    for p in unet.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _device_of(patcher: Any, module: nn.Module) -> torch.device:
    dev = getattr(patcher, "load_device", None)
    if dev is not None:
        return torch.device(dev)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def effective_mixed_precision(requested: str, device: torch.device, compute_dtype: torch.dtype) -> str:
    """Forge computes the UNet in its own dtype; on CUDA a half-precision UNet needs loss scaling
    (fp16) or bf16 autocast, whatever the config asked for."""
    if requested != "no" or device.type != "cuda":
        return requested
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(compute_dtype, requested)


class _Placement:
    """(e): the UNet and text encoder are loaded by Forge once, after the latents are encoded.

    ``encode_images`` loads the VAE (which may evict the UNet) and marks the placement stale; the
    first ``encode_text``/``predict`` after it loads the UNet and the text encoder again, once. With
    cached latents (forced by :meth:`ForgeHost.run`) that is exactly one load, before the first step."""

    def __init__(self, mm: Any, patchers: list, roots: list[nn.Module], memory_required: int = 0):
        self.mm = mm
        self.patchers = patchers
        self.roots = roots
        self.memory_required = memory_required
        self.ready = False
        self.loads = 0

    def ensure(self) -> None:
        if self.ready:
            return
        if self.memory_required:
            self.mm.load_models_gpu(self.patchers, memory_required=self.memory_required)
        else:
            self.mm.load_models_gpu(self.patchers)
        for root in self.roots:
            detach_inference_tensors(root)  # a move under inference mode makes inference tensors again
        self.loads += 1
        self.ready = True


class _Session:
    """What a generation in the middle of a run (the growing grid) changes and training needs back:
    the text engines' clip skip (Forge's processing sets it from its own option) and the placement
    (Forge may have loaded other models)."""

    def __init__(self, placement: _Placement, clip_skips: list[tuple[Any, int]]):
        self.placement = placement
        self.clip_skips = clip_skips

    def resume(self) -> None:
        for engine, skip in self.clip_skips:
            engine.clip_skip = skip
        self.placement.ready = False


# ------------------------------------------------------------------------------------ the host
def _shared() -> Any:
    from modules import shared

    return shared


def _on_forge_main_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on Forge's main thread (where it loads models) and re-raise its error here
    (``main_thread`` only prints errors)."""
    try:
        from modules_forge import main_thread
    except ImportError:
        return fn()
    if threading.current_thread() is threading.main_thread():
        return fn()
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the calling thread
            box["error"] = e

    main_thread.run_and_wait_result(call)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _submodule(model: Any, name: str) -> Any:
    try:
        return model.get_submodule(name)
    except (AttributeError, TypeError):
        return None


def _forge_part_match(forge_lora: Any, model: Any, key_map: dict, lora: dict) -> tuple[dict, dict, str]:
    """One part (UNet or text encoder) as Forge's ``load_lora`` matches it: (matched stem -> the
    layer it lands on, the file's keys still unmatched, why Forge drops the part or "")."""
    patches, remaining = forge_lora.load_lora(lora, key_map)
    weights = model.state_dict()
    applied: dict[str, HostLayer] = {}
    skipped = 0
    for stem, target in key_map.items():
        if target not in patches or f"{stem}.lora_up.weight" not in lora:
            continue
        if target in weights:
            layer = target.rpartition(".")[0]
            applied[stem] = HostLayer(target, tuple(weights[target].shape), _submodule(model, layer))
        else:  # add_patches skips a patch for a weight the model does not have
            skipped += 1
    dropped = f"{skipped} of its patches miss the model's weights" if skipped > FORGE_UNMATCHED_LIMIT else ""
    return ({} if dropped else applied), remaining, dropped


def forge_key_match(sd_model: Any, path: Path) -> HostMatch:
    """What Forge applies of the file at ``path``, by its own loader's functions as
    ``load_lora_for_models`` calls them (``backend.patcher.lora``): the key maps of the UNet and the
    text encoder, ``load_lora`` (matched patches, unmatched keys) and its limits on unmatched keys."""
    try:
        from backend.patcher import lora as forge_lora
    except ImportError as e:
        raise HostLoaderMissing(f"backend.patcher.lora cannot be imported ({e})") from None
    from safetensors.torch import load_file

    objects = getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects
    unet, text = objects.unet.model, objects.clip.cond_stage_model
    lora = load_file(str(path))
    # fresh key maps: Forge's functions default to one shared dict that grows with every call
    unet_applied, rest, unet_dropped = _forge_part_match(forge_lora, unet, forge_lora.model_lora_keys_unet(unet, {}), lora)
    text_applied, rest, text_dropped = _forge_part_match(forge_lora, text, forge_lora.model_lora_keys_clip(text, {}), rest)
    if len(rest) > FORGE_UNMATCHED_LIMIT:
        return HostMatch({}, f"{len(rest)} of its keys are unmatched, more than Forge's limit of {FORGE_UNMATCHED_LIMIT}")
    if unet_dropped and text_dropped:
        return HostMatch({}, f"UNet: {unet_dropped}; text encoder: {text_dropped}")
    return HostMatch({**unet_applied, **text_applied})


class ForgeHost:
    """Trains on Forge's loaded model. See the module docstring for the traps it handles.

    What a run leaves behind: our hooks and wrappers are removed, ``requires_grad`` flags and the
    text engine's ``clip_skip`` are restored, and Forge's LoRA bookkeeping says "no LoRA applied"
    (the next generation applies its prompt's LoRAs from the clean weights). The UNet and text
    encoder weights stay *normal* tensors, bit-identical copies of the inference tensors Forge
    loaded: Forge generates under ``torch.inference_mode()``, which reads normal tensors as they
    are; its LoRA loader backs up and restores whichever Parameter objects it finds; and a later
    move under inference mode turns them back into inference tensors, which the next training run
    copies again. Swapping them back would cost a second full copy of the weights for nothing."""

    name = "forge"
    _session: _Session | None = None

    # -- files ----------------------------------------------------------------------------
    def lora_dir(self, cfg: TrainConfig | None = None) -> Path:
        """Forge's LoRA folder (``--lora-dir``, default models/Lora), plus the settings' sub-folder."""
        return webui_lora_dir(_shared())

    def refresh_loras(self) -> None:
        """Rescan the LoRA folder (Forge's built-in Lora extension), if it is loaded."""
        try:
            import networks  # extensions-builtin/sd_forge_lora, on sys.path in Forge
        except ImportError:
            return
        rescan_loras(networks)

    # -- the model ------------------------------------------------------------------------
    def loaded_model(self, reload: bool = True) -> Any:
        """Forge's current model, after ``forge_model_reload()`` loads the checkpoint selected in
        the UI (until then ``shared.sd_model`` is a placeholder)."""
        if reload:
            try:
                from modules import sd_models
            except ImportError:
                sd_models = None
            fn = getattr(sd_models, "forge_model_reload", None)
            if fn is not None:
                _on_forge_main_thread(fn)
        sd_model = _shared().sd_model
        if (
            getattr(sd_model, "forge_objects", None) is None
            or getattr(sd_model, "forge_objects_original", None) is None
        ):
            raise LoraTrainerError(
                "Forge has no model loaded. Select a checkpoint at the top of the page and try again."
            )
        return sd_model

    def runtime_for(self, cfg: TrainConfig, sd_model: Any) -> Runtime:
        unet_patcher = sd_model.forge_objects.unet
        dm = unet_patcher.model.diffusion_model
        device = _device_of(unet_patcher, dm)
        return Runtime(device, effective_mixed_precision(cfg.mixed_precision, device, _compute_dtype(dm)))

    def model_bundle(self, cfg: TrainConfig, runtime: Runtime, sd_model: Any = None) -> ModelBundle:
        """The loaded SD1.x/SD2.x/SDXL model as a bundle. Restores clean weights (host LoRAs unmerged)
        and turns the UNet's and text encoders' inference tensors into normal ones, so call it
        with generation locked out (``run`` holds the queue lock)."""
        from backend import memory_management as mm

        if sd_model is None:
            sd_model = self.loaded_model(reload=False)
        family = forge_family(sd_model)

        restore_clean_weights(sd_model, mm.load_models_gpu)
        objs = sd_model.forge_objects
        unet_patcher, clip, vae = objs.unet, objs.clip, objs.vae
        kmodel = unet_patcher.model
        dm: nn.Module = kmodel.diffusion_model
        storage = getattr(kmodel, "storage_dtype", None) or getattr(dm, "storage_dtype", None)
        if isinstance(storage, torch.dtype) and storage not in TRAINABLE_STORAGE:
            raise LoraTrainerError(
                f"The UNet is stored as {storage} (low-bit weights). Set 'Diffusion in Low Bits' to Automatic "
                "(fp16/bf16 weights) to train a LoRA."
            )
        cond_model: nn.Module = clip.cond_stage_model
        device = runtime.device
        compute_dtype = _compute_dtype(dm)
        xl: _ForgeSDXL | None = None
        if family == "sdxl":
            xl = _ForgeSDXL(sd_model, cond_model, device, compute_dtype)
            text_encoders, engines = [xl.te1, xl.te2], xl.engines
        else:
            te_key = _TEXT_ENCODER_KEYS[family]
            te: nn.Module | None = getattr(getattr(cond_model, te_key, None), "transformer", None)
            if te is None:
                raise LoraTrainerError(
                    f"Forge's text encoder has no {te_key}.transformer; this Forge version is not supported."
                )
            text_encoders, engines = [te], [sd_model.text_processing_engine]

        for text_encoder in text_encoders:
            te_device = _device_of(clip.patcher, text_encoder)
            if cfg.train_text_encoder and not _same_device(te_device, device):
                raise LoraTrainerError(
                    f"Forge keeps the text encoder on {te_device} and the UNet on {device} (low-VRAM mode). "
                    "Turn off train_text_encoder, or give Forge more GPU weight memory."
                )
        prediction_type, alphas_cumprod = noise_schedule(kmodel.predictor, cfg.prediction_type)

        detach_inference_tensors(kmodel)
        detach_inference_tensors(cond_model)

        memory = 0
        if hasattr(unet_patcher, "memory_required"):
            lat = cfg.resolution // 8
            with contextlib.suppress(Exception):
                # backward keeps the activations: several times what sampling needs
                memory = int(unet_patcher.memory_required([cfg.train_batch_size, 4, lat, lat]) * 4)
        placement = _Placement(mm, [unet_patcher, clip.patcher], [kmodel, cond_model], memory)

        from ..model.sd import module_fingerprint

        fsm = vae.first_stage_model
        vae_id = module_fingerprint(fsm)
        regulated = _accepts(fsm.encode, "regulation")
        pass_options = _accepts(dm.forward, "transformer_options")
        info = getattr(sd_model, "sd_checkpoint_info", None)
        filename = getattr(info, "filename", None) or getattr(sd_model, "filename", None)
        model_name = Path(filename).name if filename else str(getattr(info, "title", "") or "")

        # from here on nothing raises: release() undoes these
        undo_guard = guard_inplace_residuals(dm)
        undo_ckpt: list[Callable[[], None]] = []
        # Forge's engines use layer -max(clip_skip, minimal_clip_skip) (SDXL: at least the penultimate)
        old_clip_skips = [(e, e.clip_skip) for e in engines if getattr(e, "clip_skip", None) is not None]
        for e, _ in old_clip_skips:
            e.clip_skip = max(int(cfg.clip_skip), int(getattr(e, "minimal_clip_skip", 1)))
        self._session = _Session(placement, [(e, e.clip_skip) for e, _ in old_clip_skips])

        def encode_images(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            def regulation(posterior: Any) -> torch.Tensor:
                if generator is None:
                    return posterior.mean
                noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32)
                return posterior.mean + posterior.std * noise.to(posterior.mean)

            placement.ready = False  # loading the VAE may evict the UNet
            with torch.inference_mode():
                vae_device = torch.device(getattr(vae, "device", device))
                vae_dtype = getattr(vae, "vae_dtype", torch.float32)
                need = vae.memory_used_encode(pixels.shape, vae_dtype) if hasattr(vae, "memory_used_encode") else 0
                mm.load_models_gpu([vae.patcher], memory_required=need)
                x = pixels.to(vae_device, vae_dtype)
                z = fsm.encode(x, regulation) if regulated else fsm.encode(x)
                lat = fsm.process_in(z) if hasattr(fsm, "process_in") else z
            # outside inference mode: a normal tensor
            return finite_latents(lat.to(torch.float32).clone(), vae_dtype, "start Forge with --vae-in-fp32")

        def encode_text(captions: list[str]) -> Any:
            placement.ensure()
            if xl is not None:
                return xl.encode_text(captions)
            cond = engines[0](list(captions))
            if isinstance(cond, (tuple, list)):
                cond = cond[0]
            return cond

        def condition(cond: Any, sizes: list[tuple[int, ...]] | None) -> Any:
            if xl is None or sizes is None:
                return cond
            tids = time_ids_from_sizes(sizes)
            if tids.shape[0] != cond.hidden.shape[0]:
                raise ValueError(f"{tids.shape[0]} sizes for a batch of {cond.hidden.shape[0]}")
            return SDXLCond(cond.hidden, cond.pooled, tids)

        def predict(x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            placement.ensure()
            x = x_t.to(device, compute_dtype)
            extra: dict[str, Any] = {}
            if xl is not None:
                tids = cond.time_ids
                if tids is None:  # the square, uncropped size of the latents
                    h, w = x_t.shape[-2] * 8, x_t.shape[-1] * 8
                    tids = time_ids_from_sizes([(h, w, 0, 0, h, w)] * x_t.shape[0])
                if tids.shape[0] != x_t.shape[0]:
                    raise ValueError(f"{tids.shape[0]} sizes for a batch of {x_t.shape[0]}")
                # as Forge's KModel.apply_model: context and y in the UNet's computation dtype
                extra["y"] = xl.vector(cond.pooled.to(device), tids.to(device)).to(compute_dtype)
                context = cond.hidden.to(device, compute_dtype)
            else:
                context = cond.to(device, compute_dtype)
            if pass_options:
                extra["transformer_options"] = {}
            return dm(x, t.to(device), context=context, **extra).float()

        def unet_targets(include_conv: bool) -> list[Target]:
            if xl is not None:
                # kohya's SDXL keys are the SGM module paths themselves: no name map
                conv = UNET_CONV_CONTAINERS if include_conv else frozenset()
                return find_targets(dm, "lora_unet", UNET_ATTENTION_CONTAINERS, conv)
            from ..model.ldm import ldm_unet_lora_targets

            return ldm_unet_lora_targets(dm, include_conv)

        def text_encoder_targets() -> list[Target]:
            if xl is not None:
                return xl.text_encoder_targets()
            return find_targets(text_encoders[0], "lora_te", TEXT_CONTAINERS)

        def enable_gradient_checkpointing(on: bool) -> None:
            while undo_ckpt:
                undo_ckpt.pop()()
            if on:
                undo_ckpt.append(checkpoint_unet_blocks(dm))

        def release() -> None:
            self._session = None
            enable_gradient_checkpointing(False)
            undo_guard()
            for e, skip in old_clip_skips:
                e.clip_skip = skip

        if xl is not None:
            default_resolution = 1024
        else:
            default_resolution = 768 if family == "sd2" and prediction_type == "v_prediction" else 512
        return ModelBundle(
            family=family,
            prediction_type=prediction_type,
            alphas_cumprod=alphas_cumprod,
            encode_images=encode_images,
            encode_text=encode_text,
            predict=predict,
            unet_targets=unet_targets,
            text_encoder_targets=text_encoder_targets,
            device=device,
            dtype=compute_dtype,
            trainable_roots=[dm, *text_encoders],
            model_name=model_name,
            model_hash=getattr(info, "sha256", None),
            vae_name=model_name + ":vae",
            vae_id=vae_id,
            default_resolution=default_resolution,
            enable_gradient_checkpointing=enable_gradient_checkpointing,
            release=release,
            condition=condition,
            concat_conditions=SDXLCond.cat if xl is not None else torch.cat,
        )

    # -- a run ----------------------------------------------------------------------------
    def run(self, cfg: TrainConfig, events: EventBus, stop: StopControl) -> None:
        """One training run on Forge's loaded checkpoint, with generation locked out throughout; then
        the epochs x weights grid through Forge's own txt2img (setting and ``grid_after_training``)."""
        from modules import call_queue

        from ..api import check_output_inside
        from ..train.loop import preflight, train

        shared = _shared()
        folder = self.lora_dir(cfg)
        cfg = replace(cfg, output_dir=str(folder))  # files only ever go to Forge's LoRA folder
        if not cfg.cache_latents and not cfg.cache_latents_to_disk:
            events.warning("Forge: latents are cached before training (a VAE encode per step would evict the UNet)")
            cfg = replace(cfg, cache_latents=True)
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
                and bool(getattr(getattr(shared, "opts", None), "lora_trainer_grid_after_training", True))
            ):
                grid_after_training_in_host(shared, cfg, result, scan, events, stop, ForgeGenerator())
        finally:
            lock.release()

    def build_grid(self, cfg: TrainConfig, files: list[str], events: EventBus, stop: StopControl) -> None:
        """The "Build grid" button, through Forge's txt2img."""
        build_grid_locked(_shared(), cfg, files, events, stop, ForgeGenerator(), self.refresh_loras)

    def _growing_grid(self, cfg: TrainConfig, scan: Any, bus: EventBus, stop: StopControl, sd_model: Any):
        """``after_save`` for ``grid_each_epoch``: the new epoch's column through Forge's txt2img with
        the training LoRA at weight 0. Forge's generation leaves its LoRAs merged in the weights, sets
        the text engine's clip skip from its own option and may move models: afterwards the clean
        weights are loaded back, the training clip skip set again and the placement marked stale (the
        next step loads the UNet and the text encoder once more). A failed column is reported, never fatal."""
        from backend import memory_management as mm

        from ..grid import GrowingGrid
        from ..world.sample import lora_weight

        growing = GrowingGrid(cfg, ForgeGenerator(), bus, stop, scan.trigger_word)
        bus.subscribe(growing)

        def after_save(path: Path, network: Any) -> None:
            self.refresh_loras()
            try:
                with lora_weight(network, 0.0):
                    growing.add_column(path)
            except Exception as e:  # noqa: BLE001 - the file is saved; training goes on
                bus.warning(f"the grid column for {Path(path).name} could not be made ({type(e).__name__}: {e})")
            finally:
                restore_clean_weights(sd_model, mm.load_models_gpu)
                session = self._session
                if session is not None:
                    session.resume()

        return after_save

    def _run_locked(self, cfg: TrainConfig, scan: Any, events: EventBus, stop: StopControl, shared: Any, train) -> Any:
        state = shared.state
        state.begin(job=JOB_NAME)
        mirror = _StateMirror(self, state, stop)
        bus = EventBus(mirror, events.emit)  # the host state first: listeners see it current
        try:
            sd_model = self.loaded_model(reload=True)
            runtime = self.runtime_for(cfg, sd_model)
            if runtime.mixed_precision != cfg.mixed_precision:
                events.info(f"Forge computes the UNet in half precision: mixed_precision {runtime.mixed_precision}")
                cfg = replace(cfg, mixed_precision=runtime.mixed_precision)
            if cfg.attention != "sdpa":
                events.info("attention: Forge's own cross-attention function is used")
            info = getattr(sd_model, "sd_checkpoint_info", None)
            events.info(f"base model: the loaded checkpoint {getattr(info, 'title', '') or '(unnamed)'}")
            bundle = self.model_bundle(cfg, runtime, sd_model)
            try:
                grid = self._growing_grid(cfg, scan, bus, stop, sd_model) if cfg.grid_each_epoch else None
                check = HostKeyCheck("Forge", functools.partial(forge_key_match, sd_model), bus)
                after_save = checked_after_save(check, grid)
                return train(cfg, bundle, bus, stop, runtime=runtime, scan=scan, after_save=after_save)
            finally:
                bundle.release()
        finally:
            mirror.active = False
            state.end()


class ForgeGenerator:
    """``generate(cell)`` for the grid: one txt2img through Forge's ``modules.processing``, on Forge's
    main thread (where its UI generates and loads models). The caller holds the queue lock; the
    training LoRA is off."""

    def __call__(self, cell: Any) -> Any:
        def generate() -> Any:
            # a scheduler in the sampler's name still wins over "Automatic" (Forge parses it)
            return txt2img_cell(cell, scheduler="Automatic")

        return _on_forge_main_thread(generate)


class _StateMirror:
    """Event listener: progress into ``shared.state``, Forge's Interrupt / Stop into a stop request,
    and the LoRA list refreshed after each saved file."""

    def __init__(self, host: ForgeHost, state: Any, stop: StopControl):
        self.host = host
        self.state = state
        self.stop = stop
        self.active = True

    def __call__(self, ev: Event) -> None:
        if not self.active:
            return
        st = self.state
        if getattr(st, "interrupted", False) and not self.stop.requested:
            self.stop.stop(False)
        elif getattr(st, "stopping_generation", False) and not self.stop.requested:
            self.stop.stop(True)  # "stop generating": end now, keep what was trained
        if isinstance(ev, TrainingStarted):
            st.job_count = ev.total_steps
            st.job_no = 0
            st.textinfo = f"LoRA training: {ev.total_steps} steps, {ev.epochs} epochs"
        elif isinstance(ev, CachingProgress):
            st.textinfo = f"LoRA training: caching latents {ev.done}/{ev.total}"
        elif isinstance(ev, StepEvent):
            st.job_count = ev.total_steps
            st.job_no = ev.step
            st.textinfo = (
                f"LoRA training: step {ev.step}/{ev.total_steps}, epoch {ev.epoch}, loss {ev.loss_average:.4f}"
            )
        elif isinstance(ev, FileSaved):
            self.host.refresh_loras()
            st.textinfo = f"LoRA training: saved {Path(ev.path).name}"
