"""The training loop. It sees a ModelBundle, never a host or a pipeline, and reports through events."""

from __future__ import annotations

import glob
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..dataset import DatasetScan, parse_color, process_caption, scan_dataset
from ..dataset.buckets import batches_per_process, check_bucket_config, epoch_order, padding_batches, plan_buckets
from ..dataset.steps import describe_steps, total_steps
from ..errors import ConfigError, LoraTrainerError, TrainingStopped
from ..model.bundle import ModelBundle
from ..network import SAVE_DTYPES, LoRANetwork, save_lora_file
from .cache import (
    build_latent_cache,
    build_text_encoder_cache,
    check_latent_cache_fits,
    check_text_encoder_cache,
    encode_batch,
)
from .events import (
    CachingProgress,
    EpochEnd,
    EventBus,
    FileSaved,
    StepEvent,
    StopControl,
    TrainingFinished,
    TrainingStarted,
    ValidationLoss,
)
from .metadata import RunInfo, build_metadata
from .noise import add_noise, min_snr_weight, sample_noise, sample_timesteps, target_for
from .optim import build_optimizer, check_optimizer_args, current_lrs
from .output import check_output_folder, save_or_keep
from .runtime import Runtime
from .schedulers import build_scheduler
from .state import Checkpoint, Position, find_state, open_state, position_of, run_fingerprint, save_state
from .validation import Validator, choose_validation

MAX_GRAD_NORM = 1.0
LOSS_WINDOW = 25


class NonFiniteLoss(LoraTrainerError):
    pass


@dataclass
class TrainResult:
    files: list[Path] = field(default_factory=list)
    steps: int = 0
    epochs_done: int = 0
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    network: LoRANetwork | None = None
    validation_losses: dict[int, float] = field(default_factory=dict)
    """epoch -> validation loss (epoch 0: before training)."""
    first_step_at: float = 0.0
    """``time.time()`` when the first optimizer step finished (benchmarks)."""


def epoch_file_name(output_name: str, epoch: int | None) -> str:
    """``name-000003.safetensors`` for an epoch file, ``name.safetensors`` for the final one."""
    return f"{output_name}.safetensors" if epoch is None else f"{output_name}-{epoch:06d}.safetensors"


def existing_outputs(output_dir: Path, output_name: str) -> list[Path]:
    if not output_dir.is_dir():
        return []
    pattern_files = [output_dir / epoch_file_name(output_name, None)]
    # escaped: output_name may contain '[' and ']', which glob would read as a character class
    pattern_files += sorted(output_dir.glob(f"{glob.escape(output_name)}-[0-9][0-9][0-9][0-9][0-9][0-9].safetensors"))
    return [p for p in pattern_files if p.exists()]


def plan(
    cfg: TrainConfig,
    scan: DatasetScan,
    world_size: int = 1,
    held_out_samples: int = 0,
    bucket_batches: int | None = None,
) -> tuple[int, int, int]:
    """(total optimizer steps, epochs, steps per epoch) for this dataset and process count.

    Without buckets every process trains ``ceil(samples / world_size)`` samples (``Runtime.shard``
    pads the last round). With buckets, ``bucket_batches`` is the number of batches of one epoch,
    all processes together (held-out images left out); every process trains
    ``ceil(bucket_batches / world_size)`` of them (``shard_batches`` pads the last round). Either way
    every process takes the same number of optimizer steps, which is what the LR schedule counts."""
    if bucket_batches is not None:
        per_process = batches_per_process(bucket_batches, world_size)
        # the batches are already cut: count them with a batch size of 1
        total, epochs = total_steps(
            per_process, 1, cfg.gradient_accumulation_steps, cfg.max_train_epochs, cfg.max_train_steps
        )
        return total, epochs, math.ceil(per_process / cfg.gradient_accumulation_steps)
    per_process = math.ceil((scan.num_samples - held_out_samples) / world_size)
    total, epochs = total_steps(
        per_process, cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.max_train_epochs, cfg.max_train_steps
    )
    spe = math.ceil(math.ceil(per_process / cfg.train_batch_size) / cfg.gradient_accumulation_steps)
    return total, epochs, spe


def preflight(
    cfg: TrainConfig,
    events: EventBus | None = None,
    overwrite: bool = False,
    resume: Path | None = None,
    world_size: int = 1,
) -> DatasetScan:
    """Everything that can be checked before a model is loaded: the config (with the optimizer's
    arguments), the dataset, that no existing LoRA file would be overwritten, that the output folder
    takes the files (temp files of interrupted saves removed first) and that the latent cache fits.
    With ``resume`` (a state's JSON; else the one ``cfg.resume`` names), that the state belongs to this same run; the run's own files are
    then expected. Returns the dataset scan for :func:`train`."""
    cfg.validate()
    check_text_encoder_cache(cfg)
    check_bucket_config(cfg)
    check_optimizer_args(cfg.optimizer, cfg.optimizer_args)
    scan = scan_dataset(cfg.train_data_dir, cfg.caption_extension, log=events.warning if events else None)
    output_dir = Path(cfg.output_dir)
    if resume is None and cfg.resume:
        resume = find_state(cfg, cfg.resume)
    if resume is not None and world_size > 1:
        # a state holds the first process's random generators only: every process would restore them
        raise ConfigError("resume", str(resume), "a run in one process (resuming several processes is not supported yet)")
    if resume is not None:
        open_state(resume, run_fingerprint(cfg, scan, world_size))  # raises with what differs
    clash = existing_outputs(output_dir, cfg.output_name)
    if clash and not overwrite and resume is None:
        raise ConfigError(
            "output_name",
            cfg.output_name,
            f"a name not used yet in {output_dir}: {clash[0].name} exists (hosts cache LoRAs by name, so files are never "
            "overwritten). Choose another output_name, or delete the old files",
        )
    check_latent_cache_fits(cfg, scan)
    # last: it creates the output folder (and a probe file in it) when it can
    cache_folders = sorted({s.dir for s in scan.subsets}) if cfg.cache_latents_to_disk else []
    check_output_folder(cfg, plan(cfg, scan)[1], cache_folders, events)
    return scan


def train(
    cfg: TrainConfig,
    bundle: ModelBundle,
    events: EventBus | None = None,
    stop: StopControl | None = None,
    runtime: Runtime | None = None,
    scan: DatasetScan | None = None,
    overwrite: bool = False,
    after_save: Callable[[Path, LoRANetwork], None] | None = None,
    resume: Path | None = None,
) -> TrainResult:
    """Train one LoRA on ``bundle`` and write its files to ``cfg.output_dir``.

    ``after_save(path, network)`` runs after each saved file, without grad, with the training
    network still attached (``world.sample.lora_weight(network, 0)`` turns it off): the growing grid uses it.
    The model is left as it was: hooks removed, base weights untouched, grad flags restored.

    ``resume`` (a state's JSON, else the one ``cfg.resume`` names; see ``train/state.py``) continues that run where it stood: the files
    written from then on are those the run would have written had it never stopped."""
    events = events or EventBus()
    stop = stop or StopControl()
    runtime = runtime or Runtime(bundle.device, cfg.mixed_precision)
    if scan is None:
        scan = preflight(cfg, events, overwrite, resume, runtime.world_size)
    if resume is None and cfg.resume:
        resume = find_state(cfg, cfg.resume)  # a host passes the config only
    fingerprint = {**run_fingerprint(cfg, scan, runtime.world_size), "model_hash": bundle.model_hash}
    ckpt: Checkpoint | None = open_state(resume, fingerprint).load_tensors() if resume is not None else None
    replace = overwrite or ckpt is not None  # a resumed run rewrites its own files (a Stop-and-save's final one)
    output_dir = Path(cfg.output_dir)
    entries = [e for s in scan.subsets for e in s.images]
    repeats = [s.repeats for s in scan.subsets for _ in s.images]
    val_indices, val_held_out = choose_validation(len(entries), cfg.validation_split, cfg.seed)
    if cfg.validation_split > 0 and not val_held_out:
        events.warning(
            f"validation_split is set but {len(entries)} images are too few to hold some out: "
            "the validation loss is measured on training images"
        )
    held_out = sum(repeats[i] for i in val_indices) if val_held_out else 0
    total, epochs, steps_per_epoch = plan(cfg, scan, runtime.world_size, held_out)
    summary = describe_steps(scan, cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.max_train_epochs, cfg.max_train_steps)
    # every image's bucket and crop (one square bucket without enable_bucket); the crop geometry is
    # also the size conditioning the bundle may use (SDXL), so it is planned for every run
    buckets = plan_buckets(
        [e.path for e in entries],
        cfg.resolution,
        cfg.enable_bucket,
        cfg.min_bucket_reso,
        cfg.max_bucket_reso,
        cfg.bucket_reso_steps,
        cfg.bucket_no_upscale,
    )
    geometries = [p.geometry for p in buckets.images] if cfg.enable_bucket else None
    # batches each process trains per epoch (kohya's ss_num_batches_per_epoch: per process)
    batches_per_epoch = math.ceil(math.ceil((scan.num_samples - held_out) / runtime.world_size) / cfg.train_batch_size)
    if cfg.enable_bucket:
        val_set = set(val_indices) if val_held_out else set()
        counts = {i: r for i, r in enumerate(repeats) if i not in val_set}
        bucket_batches = buckets.num_batches(counts, cfg.train_batch_size)  # all processes together
        batches_per_epoch = batches_per_process(bucket_batches, runtime.world_size)
        total, epochs, steps_per_epoch = plan(cfg, scan, runtime.world_size, held_out, bucket_batches)
        shared = ""
        if runtime.world_size > 1:
            pad = padding_batches(bucket_batches, runtime.world_size)
            shared = f"; {runtime.world_size} processes train {batches_per_epoch} of them each" + (
                f" (the last round padded with {pad} from the start of the epoch)" if pad else ""
            )
        summary += (
            f"\nbuckets: batches never mix buckets, so an epoch has {bucket_batches} batches{shared}: "
            f"{steps_per_epoch} steps per epoch, {total} steps"
        )
        events.info(buckets.report(repeats, runtime.world_size, bucket_batches))
    if runtime.world_size > 1:
        summary += f"\n{runtime.world_size} processes: each trains {steps_per_epoch} steps per epoch on its share"

    if val_held_out:
        names = ", ".join(entries[i].path.name for i in val_indices[:5]) + (", ..." if len(val_indices) > 5 else "")
        summary += (
            f"\nvalidation: {len(val_indices)} images held out ({names}); "
            f"training on the rest: {steps_per_epoch} steps per epoch, {total} steps"
        )
    changed_by = [w for w, on in (("buckets", cfg.enable_bucket), ("processes", runtime.world_size > 1),
                                   ("held-out images", val_held_out)) if on]
    if changed_by:
        # the first line is the plain dataset arithmetic; say that the lines below are what runs
        head, _, rest = summary.partition("\n")
        summary = f"{head} without {' / '.join(changed_by)}\n{rest}".rstrip("\n") + (
            f"\ntraining: {steps_per_epoch} steps per epoch, {total} steps"
        )
    events.emit(TrainingStarted(total, epochs, steps_per_epoch, scan.num_images, summary))
    background = parse_color(cfg.alpha_background)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * runtime.rank)
    torch.manual_seed(cfg.seed)  # LoRA init: the same on every process

    targets = bundle.unet_targets(cfg.network_type == "LoCon")
    if cfg.train_text_encoder:
        targets += bundle.text_encoder_targets()
    network = LoRANetwork.create(
        targets,
        cfg.network_dim,
        cfg.network_alpha,
        cfg.conv_dim if cfg.network_type == "LoCon" else None,
        cfg.conv_alpha,
    )
    network.to(bundle.device, torch.float32)
    params = [p for p in network.parameters()]
    grad_flags = [(p, p.requires_grad) for root in bundle.trainable_roots for p in root.parameters()]
    result = TrainResult()
    started = time.time()
    run = RunInfo(
        session_id=str(uuid.uuid4().int % 2**31) if not _deterministic_ids() else str(cfg.seed),
        started_at=started,
        num_images=scan.num_images,
        num_samples=scan.num_samples,
        epochs=epochs,
        total_steps=total,
        dataset_dirs=scan.dataset_dirs(),
        tag_frequency=scan.tag_frequency(),
        world_size=runtime.world_size,
        batches_per_epoch=batches_per_epoch,
        cache_latents=cfg.cache_latents or cfg.cache_latents_to_disk,
        bucket_info=buckets.info() if cfg.enable_bucket else None,
    )

    def save(epoch: int, step: int, final: bool, at: Position) -> None:
        if not runtime.is_main:
            return
        name = cfg.output_name if final else f"{cfg.output_name}-{epoch:06d}"
        path = output_dir / epoch_file_name(cfg.output_name, None if final else epoch)
        meta = build_metadata(cfg, bundle, run, output_name=name, epoch=epoch, step=step)
        if _deterministic_ids():
            meta["ss_training_started_at"] = meta["ss_training_finished_at"] = "0"
            meta["modelspec.date"] = "1970-01-01T00:00:00"
        tensors = network.kohya_state_dict(SAVE_DTYPES[cfg.save_precision])
        # never replaces a file of that name that appeared since preflight (another run), unless overwrite
        if not save_or_keep(lambda: save_lora_file(path, tensors, meta, replace=replace), path, final, events, stop):
            return
        result.files.append(path)
        events.emit(FileSaved(str(path), epoch, step, final))
        if cfg.save_state and runtime.world_size == 1:  # several processes cannot resume yet: no state to keep
            scaler = runtime.scaler
            save_or_keep(
                lambda: save_state(cfg, fingerprint, at, network, optimizer, scheduler, scaler, result.losses,
                                   result.validation_losses),
                path, False, events, stop,
            )
        if after_save is not None:
            with torch.no_grad():
                after_save(path, network)

    try:
        for root in bundle.trainable_roots:
            root.requires_grad_(False)
        network.attach()
        bundle.set_attention(cfg.attention)
        if cfg.gradient_checkpointing:
            bundle.enable_gradient_checkpointing(True)

        def caching_progress(done: int, total_images: int) -> None:
            events.emit(CachingProgress(done, total_images))
            if stop.requested:
                raise TrainingStopped("stopped while caching latents")

        latents: list[torch.Tensor] | None = None
        if cfg.cache_latents_to_disk and not cfg.cache_latents:
            events.warning("cache_latents_to_disk is on, so latents are cached although cache_latents is off")
        if cfg.cache_latents or cfg.cache_latents_to_disk:
            events.info(f"caching latents of {len(entries)} images" + (" (on disk)" if cfg.cache_latents_to_disk else ""))
            latents = build_latent_cache(
                bundle.encode_images,
                [e.path for e in entries],
                cfg.resolution,
                background,
                bundle.vae_id,
                cfg.cache_latents_to_disk,
                progress=caching_progress,
                geometries=geometries,
            )

        optimizer = build_optimizer(
            cfg.optimizer,
            _param_groups(network, cfg),
            cfg.optimizer_args,
            cfg.learning_rate,
        )
        scheduler = build_scheduler(
            cfg.lr_scheduler, optimizer, total, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power
        )
        if ckpt is not None:
            _restore(ckpt, network, optimizer, scheduler, runtime)
        excluded = set(val_indices) if val_held_out else set()
        samples = [i for i, r in enumerate(repeats) if i not in excluded for _ in range(r)]

        def latents_of(idx: list[int]) -> torch.Tensor:
            if latents is not None:
                return torch.stack([latents[i] for i in idx])
            return encode_batch(
                bundle.encode_images,
                [entries[i].path for i in idx],
                cfg.resolution,
                background,
                [geometries[i] for i in idx] if geometries else None,
            )

        validate = Validator(
            bundle,
            latents_of,
            [e.caption for e in entries],
            val_indices,
            cfg.seed,
            runtime.autocast,
            batch_size=1 if cfg.enable_bucket else 4,  # one image at a time: buckets differ in size
        )
        text_cache = None
        if cfg.cache_text_encoder_outputs:
            events.info(f"caching text-encoder outputs of {len({e.caption for e in entries})} captions")
            with runtime.autocast():
                text_cache = build_text_encoder_cache(bundle.encode_text, [e.caption for e in entries])

        def emit_validation(epoch: int) -> None:
            if not cfg.validation_loss:
                return
            v = validate()
            result.validation_losses[epoch] = v
            events.emit(ValidationLoss(epoch, v, val_held_out, len(val_indices)))

        caption_rng = random.Random(cfg.seed * 1_000_003 + runtime.rank)
        caption_random = cfg.shuffle_caption or cfg.caption_dropout_rate > 0 or cfg.caption_tag_dropout_rate > 0
        recent: deque[float] = deque(maxlen=LOSS_WINDOW)
        step = 0
        resumed_at: Position | None = None
        if ckpt is None:
            emit_validation(0)
        else:
            resumed_at = position_of(ckpt)
            resumed_at.restore(gen, caption_rng)
            step = ckpt.step
            result.losses = list(ckpt.tensors["losses"])
            recent.extend(result.losses)
            result.validation_losses = {int(k): v for k, v in ckpt.info["validation_losses"].items()}
            events.info(f"resuming {ckpt.path.name}: epoch {ckpt.epoch}, step {step} of {total}")
        first_step = step
        loop_start = time.time()
        for epoch in range(resumed_at.epoch if resumed_at else 1, epochs + 1):
            order = epoch_order(samples, cfg.seed, epoch)  # the same on every process
            if cfg.enable_bucket:
                # cut into bucket batches first, then share the batches out: equal counts on every process
                batches = buckets.epoch_batches(order, cfg.train_batch_size, runtime.rank, runtime.world_size)
            else:  # one square bucket: share the samples out, then plain chunks of this process's share
                batches = buckets.batches(list(runtime.shard(order)), cfg.train_batch_size)
            skip = resumed_at.position if resumed_at and resumed_at.epoch == epoch else 0
            epoch_losses: list[float] = list(resumed_at.epoch_losses) if skip else []
            accum_losses: list[float] = []
            optimizer.zero_grad(set_to_none=True)
            interrupted = False  # a stop that comes after the epoch's last step does not discard the epoch
            # where a Stop resumes from: the last optimizer step (a stop mid-accumulation drops the partial one)
            mark = Position.take(epoch, skip, step, gen, caption_rng, epoch_losses)
            for b_idx, batch in enumerate(batches):
                if b_idx < skip:
                    continue
                if stop.requested:
                    interrupted = True
                    break
                x0 = latents_of(batch).to(bundle.device)
                captions = [
                    process_caption(
                        entries[i].caption,
                        caption_rng,
                        cfg.shuffle_caption,
                        cfg.keep_tokens,
                        cfg.caption_tag_dropout_rate,
                        cfg.caption_dropout_rate,
                    )
                    if caption_random
                    else entries[i].caption
                    for i in batch
                ]
                noise = sample_noise(x0.shape, gen, cfg.noise_offset).to(bundle.device)
                t = sample_timesteps(x0.shape[0], len(bundle.alphas_cumprod), gen).to(bundle.device)
                x0 = x0.float()
                x_t = add_noise(x0, noise, t, bundle.alphas_cumprod)
                target = target_for(bundle.prediction_type, x0, noise, t, bundle.alphas_cumprod)
                with runtime.autocast():
                    if text_cache is not None:
                        cond = bundle.concat_conditions([text_cache[c] for c in captions])
                    else:
                        with torch.set_grad_enabled(cfg.train_text_encoder):
                            cond = bundle.encode_text(captions)
                    cond = bundle.condition(cond, [buckets.images[i].geometry for i in batch])
                    pred = bundle.predict(x_t.to(bundle.dtype), t, cond)
                loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if cfg.min_snr_gamma:
                    loss = loss * min_snr_weight(t, bundle.alphas_cumprod, cfg.min_snr_gamma, bundle.prediction_type)
                loss = loss.mean()
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"The loss became {loss.item()} at epoch {epoch}, step {step + 1}. Lower the learning rate, "
                        "use bf16 instead of fp16, or check the dataset for broken images."
                    )
                runtime.backward(loss / cfg.gradient_accumulation_steps)
                accum_losses.append(loss.item())
                last_in_epoch = b_idx == len(batches) - 1
                if (b_idx + 1) % cfg.gradient_accumulation_steps and not last_in_epoch:
                    continue
                runtime.step(optimizer, params, MAX_GRAD_NORM)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_loss = sum(accum_losses) / len(accum_losses)
                accum_losses.clear()
                recent.append(step_loss)
                epoch_losses.append(step_loss)
                result.losses.append(step_loss)
                now = time.time()
                if step == 1:
                    result.first_step_at = now
                mark = Position.take(epoch, b_idx + 1, step, gen, caption_rng, epoch_losses)
                done_since = now - loop_start
                eta = done_since / (step - first_step) * (total - step)
                lrs = dict(zip([g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)], current_lrs(optimizer)))
                events.emit(StepEvent(step, total, epoch, step_loss, sum(recent) / len(recent), lrs, now - started, eta))
                if step >= total:
                    break
            if interrupted:
                result.stopped = True
                if stop.save and step > 0:
                    save(epoch if b_idx > 0 else epoch - 1, step, final=True, at=mark)
                break
            result.epochs_done = epoch
            mean = sum(epoch_losses) / max(len(epoch_losses), 1)
            events.emit(EpochEnd(epoch, mean, step))
            emit_validation(epoch)
            # a finished epoch resumes at the next one's start; a run cut by max_train_steps where it stopped
            done = Position.take(epoch + 1, 0, step, gen, caption_rng, []) if mark.position >= len(batches) else mark
            is_last = epoch == epochs or step >= total
            if is_last:
                save(epoch, step, final=True, at=done)
                break
            if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0:
                save(epoch, step, final=False, at=done)
        result.steps = step
        runtime.barrier()
    except TrainingStopped:
        result.stopped = True
    finally:
        network.detach()
        if cfg.gradient_checkpointing:
            bundle.enable_gradient_checkpointing(False)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        bundle.release()
    result.seconds = time.time() - started
    events.emit(TrainingFinished([str(p) for p in result.files], result.stopped, result.steps, result.seconds))
    result.network = network
    return result


def _restore(ckpt: Checkpoint, network: LoRANetwork, optimizer, scheduler, runtime: Runtime) -> None:
    """Weights, optimizer, schedule and loss scaler as they were when the state was saved."""
    t = ckpt.tensors
    network.load_state_dict(t["network"])
    optimizer.load_state_dict(t["optimizer"])
    scheduler.load_state_dict(t["scheduler"])
    if runtime.scaler is not None and t["scaler"]:
        runtime.scaler.load_state_dict(t["scaler"])


def _param_groups(network: LoRANetwork, cfg: TrainConfig) -> list[dict]:
    """UNet and text-encoder groups; the second text encoder (``lora_te2_``, SDXL) gets its own group
    with ``text_encoder2_lr`` (0 = the first encoder's rate)."""
    groups = network.param_groups(cfg.effective_unet_lr, cfg.effective_text_encoder_lr)
    te2 = [p for m in network.loras if m.lora_name.startswith("lora_te2_") for p in m.parameters()]
    if not te2:
        return groups
    ids = {id(p) for p in te2}
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    groups = [g for g in groups if g["params"]]
    groups.append({"params": te2, "lr": cfg.effective_text_encoder2_lr, "name": "text_encoder2"})
    return groups


def _deterministic_ids() -> bool:
    """LORA_TRAINER_DETERMINISTIC=1 fixes the time stamps and session id (byte-identical files: the README says when)."""
    import os

    return os.environ.get("LORA_TRAINER_DETERMINISTIC", "") == "1"
