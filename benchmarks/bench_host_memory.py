"""Peak memory of in-host training against the host idle (A1111 adapter, CPU).

The host model is built as A1111 holds it (a real ``ldm`` UNetModel, an HF CLIP text encoder in
A1111's wrapper, a KL VAE) inside the fake ``modules`` package of tests/test_host_a1111.py, at a
size where a second copy would be obvious (about 140 M UNet parameters, ~0.5 GiB in fp32). The
difference between the idle host and the peak during training must be the LoRA, the optimizer
state and activations, not a second model.

    python benchmarks/bench_host_memory.py [--steps 4] [--channels 128]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    def __init__(self, every: float = 0.005):
        super().__init__(daemon=True)
        self.every, self.peak, self.running = every, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--channels", type=int, default=128, help="UNet model_channels (SD1.5: 320)")
    args = ap.parse_args()

    import pytest

    from lora_trainer.config import TrainConfig
    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StopControl
    from tests import test_host_a1111 as fake

    tmp = Path(tempfile.mkdtemp(prefix="lora_trainer_mem_"))
    sd = fake.build_fake_sd_model(tmp / "tok")
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    with contextlib.redirect_stdout(io.StringIO()):
        unet = openaimodel.UNetModel(
            image_size=8, in_channels=4, out_channels=4, model_channels=args.channels, attention_resolutions=[1, 2, 4],
            num_res_blocks=2, channel_mult=(1, 2, 4, 4), num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=32, legacy=False,
        )
    sd.model.diffusion_model = unet.eval().requires_grad_(True)
    mp = pytest.MonkeyPatch()
    env = fake.install_fake_webui(mp, tmp)
    env.shared.sd_model = sd
    data = make_demo_dataset(tmp / "data", images=4, size=64, repeats=2)
    cfg = TrainConfig(
        train_data_dir=str(data), output_name="mem", resolution=64, network_dim=4, network_alpha=4.0,
        max_train_steps=args.steps, save_every_n_epochs=0, lr_scheduler="constant", grid_after_training=False,
    )
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in sd.parameters())
    gc.collect()
    idle = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.time()
    A1111Host().run(cfg, EventBus(), StopControl())
    sampler.running = False
    sampler.join()
    from safetensors.torch import load_file

    files = sorted((Path(env.shared.cmd_opts.lora_dir)).glob("mem*.safetensors"))
    lora_params = sum(t.numel() for k, t in load_file(files[-1]).items() if not k.endswith("alpha"))
    mib = 1 << 20
    print(f"host model (UNet {unet_bytes / mib:.0f} MiB, all {model_bytes / mib:.0f} MiB in fp32), {args.steps} steps, "
          f"{time.time() - t0:.1f} s")
    print(f"{'RSS, host idle':36s}{idle / mib:10.0f} MiB")
    print(f"{'peak RSS during training':36s}{sampler.peak / mib:10.0f} MiB")
    print(f"{'difference':36s}{(sampler.peak - idle) / mib:10.0f} MiB")
    print(f"{'LoRA + AdamW state (fp32)':36s}{lora_params * 4 * 3 / mib:10.1f} MiB  ({lora_params} parameters)")
    print(f"{'a second copy of the model would add':36s}{model_bytes / mib:10.0f} MiB")
    mp.undo()


if __name__ == "__main__":
    main()
