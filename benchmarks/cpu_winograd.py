"""CPU float32: 3x3 convolutions by NNPACK's Winograd transform against oneDNN's direct convolution, per network.

The full-size SD 2.1-base networks (random weights from --models, as speed_vs_release.py writes them): the VAE
encoder on a 512 px image, the decoder on its 64 px latent, and one UNet call on that latent (batch 1, and
batch 2 as a guided step runs it). Each network runs direct and Winograd in interleaved repeats; prints the
median seconds of each, the ratio, and the max abs difference of the outputs (the output's range beside it).

    PYTHONPATH=src python benchmarks/cpu_winograd.py --models /tmp/speed_models --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-speed-models"))
    parser.add_argument("--size", type=int, default=512, help="image side, px (latent: size / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=["encode", "decode", "unet", "unet-batch2"],
                        choices=["encode", "decode", "unet", "unet-batch2"])
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffsr.nets.winograd import available, use_winograd

    if not available():
        raise SystemExit("cpu_winograd: this torch has no NNPACK for this CPU")
    base = args.models / "sd21-full"
    if not (base / "unet").is_dir():
        raise SystemExit(f"cpu_winograd: no full-size base at {base} (speed_vs_release.py writes it)")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, args.size, args.size), generator=generator) * 2 - 1
    latent = torch.randn((1, 4, args.size // 8, args.size // 8), generator=generator)
    text = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator)
    runs = {
        "encode": (vae, lambda: vae.encode(image).latent_dist.mean),
        "decode": (vae, lambda: vae.decode(latent).sample),
        "unet": (unet, lambda: unet(latent, 999, text[:1]).sample),
        "unet-batch2": (unet, lambda: unet(latent.expand(2, -1, -1, -1), 999, text).sample),
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# cpu_winograd {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, {platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads, float32, {args.size} px image / {args.size // 8} px latent, "
          f"{args.repeats} repeats interleaved")
    print("| network | direct s (median) | Winograd s (median) | Winograd / direct | max abs difference | "
          "output max abs |")
    print("|---|---|---|---|---|---|")
    for part in args.parts:
        network, run = runs[part]
        times, outputs = {"direct": [], "winograd": []}, {}
        for repeat in range(args.repeats):
            for mode in ("direct", "winograd") if repeat % 2 == 0 else ("winograd", "direct"):
                use_winograd([network], enabled=mode == "winograd")
                start = time.perf_counter()
                with torch.no_grad():
                    outputs[mode] = run()
                times[mode].append(time.perf_counter() - start)
                print(f"#   {part} {mode}: {times[mode][-1]:.2f} s", flush=True)
        direct, fast = statistics.median(times["direct"]), statistics.median(times["winograd"])
        difference = (outputs["winograd"] - outputs["direct"]).abs().max().item()
        print(f"| {part} | {direct:.2f} | {fast:.2f} | {fast / direct:.2f}x | {difference:.2e} | "
              f"{outputs['direct'].abs().max().item():.2f} |", flush=True)


if __name__ == "__main__":
    main()
