"""Peak memory of the whole-image steps after decoding (colour fix, clamp, conversion to an array) at 4096 px.

These are the steps whose memory grows with the image once the networks run in tiles; each colour fix runs in
a fresh subprocess, its peak resident memory (VmHWM) reset after the inputs are made.

    PYTHONPATH=src python benchmarks/postprocess_memory.py --size 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiling_memory import peak_rss_gb, reset_peak  # noqa: E402


def child(size: int, fix: str) -> dict:
    from diffsr.images import tensor_to_array
    from diffsr.methods.base import color_fix_and_clamp

    generator = torch.Generator().manual_seed(0)
    decoded = (torch.rand((1, 3, size, size), generator=generator) * 2.2 - 1.1).to(torch.bfloat16)  # VAE output
    lr = torch.rand((1, 3, size, size), generator=generator)  # the upscaled input, float32 as upscale keeps it
    reset_peak()
    before = peak_rss_gb()
    start = time.perf_counter()
    restored = (decoded.float() + 1) / 2  # as the methods return it
    rgb = tensor_to_array(color_fix_and_clamp(restored, lr, fix))
    seconds = time.perf_counter() - start
    return {"fix": fix, "size": size, "extra_gb": peak_rss_gb() - before, "seconds": seconds,
            "image_gb": lr.numel() * 4 / 2**30, "checksum": int(rgb[::97, ::89].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.size, args.child)))
        return
    print(f"# whole-image steps after decoding, {args.size} px, torch {torch.__version__}")
    print("| colour fix | peak above inputs GB | in float32 images (3 x H x W) | seconds |")
    print("|---|---|---|---|")
    for fix in ("adain", "wavelet", "none"):
        done = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", fix],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {fix} | {row['extra_gb']:.2f} | {row['extra_gb'] / row['image_gb']:.1f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
