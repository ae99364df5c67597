"""Where training runs: device, processes, mixed precision.

``accelerate launch`` (and torchrun) start each process with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR in the environment; we join that process group with torch.distributed directly and
average LoRA gradients ourselves. That keeps the loop the same inside a WebUI (one process,
no launcher, whatever accelerate version the host pins) and under a multi-GPU launch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch

from ..errors import ConfigError


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler for fp16 training on ``device``.

    ``torch.amp.GradScaler(device)`` is torch 2.3 and later; A1111 1.10 ships torch 2.1.2, where the CUDA
    scaler is ``torch.cuda.amp.GradScaler`` (deprecated, with a warning, from 2.4 on)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    if device.type != "cuda":
        raise ConfigError("mixed_precision", "fp16", f"no or bf16 (torch {torch.__version__} scales fp16 losses on CUDA only)")
    return torch.cuda.amp.GradScaler()


class Runtime:
    def __init__(self, device: torch.device | str, mixed_precision: str = "no", rank: int = 0, world_size: int = 1):
        device = torch.device(device)
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.mixed_precision = mixed_precision
        if mixed_precision == "fp16" and device.type != "cuda":
            raise ConfigError("mixed_precision", "fp16", "no or bf16 when training on a CPU (fp16 needs a CUDA GPU)")
        self.scaler = grad_scaler(device) if mixed_precision == "fp16" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype for the frozen base weights (kohya casts them to the mixed-precision type)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)

    @classmethod
    def from_env(cls, mixed_precision: str = "no", device: str | None = None) -> Runtime:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu" and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
        dev = torch.device(device) if device else torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if world > 1 and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)  # --device cuda: one GPU per process, not all on GPU 0
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
        return cls(dev, mixed_precision, rank, world)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_grad_norm: float) -> None:
        """Average gradients over processes, unscale, clip, step."""
        self.all_reduce_grads(params)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def all_reduce_grads(self, params: Iterable[torch.Tensor]) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, items: list) -> Iterator:
        """This process's share of a list (every world_size-th item).

        Every process gets the same number of items (ceil(len / world_size)): the list is padded
        by wrapping around, as torch's DistributedSampler does. Otherwise a process with fewer
        batches would skip a gradient all-reduce the others wait for, and the run would hang."""
        if self.world_size > 1 and items:
            pad = -len(items) % self.world_size
            items = items + (items * (pad // len(items) + 1))[:pad]
        return iter(items[self.rank :: self.world_size])
