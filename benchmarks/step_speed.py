"""Seconds per sampling step at 512 px output (64x64 latent) of the multi-step methods, full-size architecture,
random weights, CPU, float32, batch 1, no CFG: diffsr against the authors' model code, measured in the same run;
prints the ratio (issue #22's goal: at most 0.8).

- stablesr: the SD 2.1 UNet with SFT layers + the time-aware encoder (StableSR.network's per-step call)
- ccsr: ControlNet + the SD 2.1 UNet (CCSR.denoise, the method's own core); the authors' side is CCSR v1's
  networks, which have v2's shapes

    PYTHONPATH=src python benchmarks/step_speed.py --method ccsr --reference-python /path/to/ref/venv/bin/python \\
        [--steps 2] [--rounds 2] [--threads 2] [--latent 64] [--direct]

diffsr's convolutions run as load_upscaler runs them on the CPU in float32: by Winograd (diffsr.nets.winograd);
--direct: oneDNN's direct convolution. The authors' side: benchmarks/step_speed_reference.py (STABLESR_SRC or
CCSR_SRC: a local checkout of their code, never copied here).
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


def build_ours(method: str):
    """(the per-step denoiser call (x, t, lr_latent, text) -> eps, its networks)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_UNET).eval()
    if method == "stablesr":
        from diffsr.nets.stablesr_nets import SFTUNet, TimeAwareEncoder

        unet, encoder = SFTUNet(unet, cond_channels=256).eval(), TimeAwareEncoder().eval()
        return (lambda x, t, lr_latent, text: unet(x, t, text, encoder(lr_latent, t))), [unet, encoder]
    from diffsr.backbone import Backbone
    from diffsr.methods.ccsr import CCSR
    from diffsr.nets.ccsr_controlnet import controlnet_from_unet

    ccsr = CCSR(Backbone(unet, None, None, None, {}), controlnet_from_unet(unet, condition_seed=0).eval(), 2)
    return (lambda x, t, lr_latent, text: ccsr.denoise(x, lr_latent, text, t)), [unet, ccsr.controlnet]


def time_ours(step, steps: int, latent: int) -> list[float]:
    """Seconds of each DDPM step (the networks + the update), the first one a warm-up."""
    lr_latent = torch.randn(1, 4, latent, latent)
    text = torch.randn(1, 77, 1024)
    ticks = []
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)

    def model(x, t):
        eps = step(x, t, lr_latent, text)
        ticks.append(time.perf_counter())  # a step: the previous update and this call
        return eps

    start = time.perf_counter()
    with torch.no_grad():
        sample_ddpm(model, torch.randn(1, 4, latent, latent), Schedule.respaced(abar, steps + 1),
                    torch.Generator().manual_seed(0))
    return [b - a for a, b in zip([start] + ticks[:-1], ticks)]


def time_theirs(args) -> list[float]:
    env = dict(os.environ, **({"STABLESR_SRC": args.release_src} if args.method == "stablesr" else
                              {"CCSR_SRC": args.release_src}))
    out = subprocess.run([args.reference_python, str(HERE / "step_speed_reference.py"), args.method,
                          str(args.steps), str(args.threads), str(args.latent)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["times"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["stablesr", "ccsr"], default="stablesr")
    parser.add_argument("--reference-python", required=True, help="python of the venv that runs the authors' code")
    parser.add_argument("--release-src", help="checkout of the authors' code (default: $STABLESR_SRC or "
                                              "/work/refs/stablesr/src; $CCSR_SRC or /work/refs/ccsr/v1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours / theirs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent size (64 = 512 px output)")
    parser.add_argument("--direct", action="store_true", help="diffsr with direct convolution (no Winograd)")
    args = parser.parse_args()
    if args.release_src is None:
        args.release_src = (os.environ.get("STABLESR_SRC", "/work/refs/stablesr/src") if args.method == "stablesr"
                            else os.environ.get("CCSR_SRC", "/work/refs/ccsr/v1"))
    torch.set_num_threads(args.threads)
    step, networks = build_ours(args.method)
    if not args.direct:
        from diffsr.nets.winograd import use_winograd

        use_winograd(networks)
    params = sum(p.numel() for network in networks for p in network.parameters())
    mine, theirs = [], []
    # Alternate, and compare the fastest steps: on a shared machine the minimum is the least disturbed figure.
    for _ in range(args.rounds):
        mine += time_ours(step, args.steps, args.latent)[1:]
        theirs += time_theirs(args)[1:]
    print(f"diffsr:  {min(mine):.2f} s/step min, {statistics.median(mine):.2f} median ({params / 1e6:.0f} M params; "
          f"{[round(t, 2) for t in mine]})")
    print(f"authors: {min(theirs):.2f} s/step min, {statistics.median(theirs):.2f} median "
          f"({[round(t, 2) for t in theirs]})")
    print(f"ratio diffsr / authors: {min(mine) / min(theirs):.3f} (min), "
          f"{statistics.median(mine) / statistics.median(theirs):.3f} (median)  "
          f"[{args.method}, torch {torch.__version__}, {args.threads} threads, CPU, float32, {args.latent * 8} px "
          f"output, diffsr {'direct' if args.direct else 'Winograd'} convolutions]")


if __name__ == "__main__":
    sys.exit(main())
