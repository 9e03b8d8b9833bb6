"""Seconds per StableSR sampling step at 512 px output (64x64 latent), full-size architecture
(SD 2.1 UNet with SFT layers + time-aware encoder, random weights), CPU, float32, batch 1, no CFG:
diffsr against the authors' model code, measured in the same run; prints the ratio (goal <= 1).

    PYTHONPATH=src python benchmarks/stablesr_step_speed.py --reference-python /path/to/ref/venv/bin/python \\
        [--stablesr-src /path/to/IceClear/StableSR] [--steps 2] [--rounds 2] [--threads 2] [--latent 64]

The reference venv needs torch (same version), numpy, omegaconf, einops, tqdm; see
benchmarks/stablesr_reference_step.py.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffsr.samplers import Schedule, sample_ddpm

HERE = Path(__file__).resolve().parent
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                 flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32)


def build_ours():
    from diffusers import UNet2DConditionModel

    from diffsr.nets.stablesr_nets import SFTUNet, TimeAwareEncoder

    torch.manual_seed(0)
    unet = SFTUNet(UNet2DConditionModel(**SD21_UNET), cond_channels=256).eval()
    return unet, TimeAwareEncoder().eval()


def time_ours(unet, encoder, steps: int, latent: int) -> list[float]:
    """Seconds of each DDPM step (encoder + SFT UNet + update), the first one a warm-up."""
    lr_latent = torch.randn(1, 4, latent, latent)
    text = torch.randn(1, 77, 1024)
    ticks = []

    def model(x, t):  # the per-step denoiser call of StableSR.network
        return unet(x, t, text, encoder(lr_latent, t))

    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    start = time.perf_counter()
    sample_ddpm(model, torch.randn(1, 4, latent, latent), Schedule.respaced(abar, steps + 1),
                torch.Generator().manual_seed(0), callback=lambda done: ticks.append(time.perf_counter()))
    return [b - a for a, b in zip([start] + ticks[:-1], ticks)]


def time_theirs(args, latent: int) -> list[float]:
    env = dict(os.environ, STABLESR_SRC=args.stablesr_src)
    out = subprocess.run([args.reference_python, str(HERE / "stablesr_reference_step.py"), str(args.steps),
                          str(args.threads), str(latent)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["times"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", required=True, help="python of the venv that runs the authors' code")
    parser.add_argument("--stablesr-src", default=os.environ.get("STABLESR_SRC", "/work/refs/stablesr/src"))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours / theirs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent size (64 = 512 px output)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet, encoder = build_ours()
    params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in encoder.parameters())
    mine, theirs = [], []
    # Alternate, and compare the fastest steps: on a shared machine the minimum is the least disturbed figure.
    for _ in range(args.rounds):
        mine += time_ours(unet, encoder, args.steps, args.latent)[1:]
        theirs += time_theirs(args, args.latent)[1:]
    print(f"diffsr:  {min(mine):.2f} s/step min, {statistics.median(mine):.2f} median ({params / 1e6:.0f} M params; "
          f"{[round(t, 2) for t in mine]})")
    print(f"authors: {min(theirs):.2f} s/step min, {statistics.median(theirs):.2f} median "
          f"({[round(t, 2) for t in theirs]})")
    print(f"ratio diffsr / authors: {min(mine) / min(theirs):.3f} (min), "
          f"{statistics.median(mine) / statistics.median(theirs):.3f} (median)  "
          f"[torch {torch.__version__}, {args.threads} threads, CPU, float32, {args.latent * 8} px output]")


if __name__ == "__main__":
    sys.exit(main())
