"""S3Diff guidance: one batched UNet call for both branches (diffsr) against two calls (the release).

Full-size SD-Turbo UNet architecture (UNet2DConditionModel with the SD 2.1-base config, random weights,
nothing downloaded) carrying the release's degradation-guided LoRA (rank 32 on its 13 target names), one
64x64 latent (a 512x512 output), t = 999, on the CPU unless --device says otherwise. Prints the seconds
per guided step both ways, the speed-up and the largest difference between the two results.

    PYTHONPATH=src python benchmarks/bench_s3diff_cfg.py [--repeats 2] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from diffsr.lora import add_degradation_lora
from diffsr.checkpoints.s3diff import RANK_UNET, UNET_TARGETS
from diffsr.methods.s3diff import GUIDANCE_SCALE, TIMESTEP
from diffsr.nets.s3diff_modulation import UNET_BLOCKS, unet_block
from diffsr.samplers import guide

# stabilityai/sd-turbo's unet/config.json (the SD 2.1-base UNet).
SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
)


def batched(unet, latent, text, scale):
    """diffsr's guidance (S3Diff.noise): both branches in one UNet call, positive rows first."""
    return guide(lambda x, texts: unet(x, TIMESTEP, encoder_hidden_states=texts).sample, latent, text[:1], text[1:],
                 scale, negative_first=False)


def two_calls(unet, latent, text, scale):
    """The release's guidance: a UNet call per prompt."""
    positive = unet(latent, TIMESTEP, encoder_hidden_states=text[:1]).sample
    negative = unet(latent, TIMESTEP, encoder_hidden_states=text[1:]).sample
    return negative + scale * (positive - negative)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


LOAD_BEFORE = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_TURBO_UNET).eval()
    modulation = add_degradation_lora(unet, UNET_TARGETS, RANK_UNET, "default", unet_block)
    unet.requires_grad_(False)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.01)  # peft starts B at zero; make the adapters act
    unet.to(device)
    layers = sum(1 for m in unet.modules() if hasattr(m, "modulation"))
    latent = torch.randn(1, 4, 64, 64, device=device)
    text = torch.randn(2, 77, 1024, device=device)  # [positive, negative] prompt embeddings
    matrices = torch.randn(1, UNET_BLOCKS, RANK_UNET, RANK_UNET, device=device) / RANK_UNET**0.5

    def timed(fn):
        """(wall seconds, CPU seconds of this process, result). On a shared machine the CPU time is the
        steadier measure: it does not count the time other processes hold the cores."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(unet, latent, text, GUIDANCE_SCALE)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu, out

    runs = {"batched (diffsr)": [], "two calls (release)": []}
    with torch.no_grad(), modulation.use(matrices):
        timed(batched), timed(two_calls)  # warm-up
        for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
            *seconds, together = timed(batched)
            runs["batched (diffsr)"].append(seconds)
            *seconds, separate = timed(two_calls)
            runs["two calls (release)"].append(seconds)
    print(f"# S3Diff classifier-free guidance, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    where = f"{cpu_name()}, {args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"# {where}; torch {torch.__version__}, {platform.system()} {platform.machine()}; "
          f"load average before the run {LOAD_BEFORE}")
    print(f"# SD-Turbo UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters) with "
          f"{layers} degradation-guided LoRA layers (rank {RANK_UNET}), latent 1x4x64x64, best of {args.repeats}")
    best = {}
    for name, values in runs.items():
        best[name] = [min(v[i] for v in values) for i in (0, 1)]
        listed = ", ".join(f"{wall:.1f}/{cpu:.1f}" for wall, cpu in values)
        print(f"{name:20s} wall {best[name][0]:7.2f} s   CPU {best[name][1]:7.2f} s   (runs wall/CPU: {listed})")
    for i, measure in enumerate(("wall-clock", "CPU time")):
        ratio = best["two calls (release)"][i] / best["batched (diffsr)"][i]
        print(f"speed-up of one batched call over two calls ({measure}): {ratio:.2f}x")
    print(f"max abs difference between the two results: {(together - separate).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
