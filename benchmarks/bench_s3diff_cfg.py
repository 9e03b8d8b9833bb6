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
import platform
import time

import torch

from diffsr.lora import add_degradation_lora
from diffsr.methods.s3diff import GUIDANCE_SCALE, RANK_UNET, TIMESTEP, UNET_BLOCKS, UNET_TARGETS, guided_noise, unet_block

# stabilityai/sd-turbo's unet/config.json (the SD 2.1-base UNet).
SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
)


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
    unet = UNet2DConditionModel(**SD_TURBO_UNET).eval().requires_grad_(False)
    modulation = add_degradation_lora(unet, UNET_TARGETS, RANK_UNET, "default", unet_block)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.01)  # peft starts B at zero; make the adapters act
    unet.to(device)
    layers = sum(1 for m in unet.modules() if hasattr(m, "modulation"))
    latent = torch.randn(1, 4, 64, 64, device=device)
    text = torch.randn(2, 77, 1024, device=device)  # [positive, negative] prompt embeddings
    matrices = torch.randn(1, UNET_BLOCKS, RANK_UNET, RANK_UNET, device=device) / RANK_UNET**0.5

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(unet, latent, text, GUIDANCE_SCALE)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    times = {"batched (diffsr)": [], "two calls (release)": []}
    with torch.no_grad(), modulation.use(matrices):
        timed(guided_noise)  # warm-up
        for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
            seconds, batched = timed(guided_noise)
            times["batched (diffsr)"].append(seconds)
            seconds, separate = timed(two_calls)
            times["two calls (release)"].append(seconds)
    best = {name: min(values) for name, values in times.items()}
    print(f"# S3Diff classifier-free guidance, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    where = f"{cpu_name()}, {args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"# {where}; torch {torch.__version__}, {platform.system()} {platform.machine()}")
    print(f"# SD-Turbo UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters) with "
          f"{layers} degradation-guided LoRA layers (rank {RANK_UNET}), latent 1x4x64x64, best of {args.repeats}")
    for name, values in times.items():
        print(f"{name:22s} {best[name]:8.2f} s   (runs: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"speed-up of one batched call over two calls: {best['two calls (release)'] / best['batched (diffsr)']:.2f}x")
    print(f"max abs difference between the two results: {(batched - separate).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
