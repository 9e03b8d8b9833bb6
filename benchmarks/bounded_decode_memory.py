"""Resident memory of the bounded VAE decoder against the number of tiles, at one tile size (a lead for #3).

Full-size SD VAE (random weights, from tiling_memory.py's --models folder), bf16, 32-latent-px tiles. If
memory were bounded by the tile, the peak above the start would not depend on the latent's size. Run it with
and without `MALLOC_MMAP_THRESHOLD_=131072` (glibc then stops keeping freed mid-sized blocks in its heaps):

    PYTHONPATH=src python benchmarks/bounded_decode_memory.py 64 64
    MALLOC_MMAP_THRESHOLD_=131072 PYTHONPATH=src python benchmarks/bounded_decode_memory.py 64 128
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from diffsr import tiling

sys.path.insert(0, str(Path(__file__).parent))
from tiling_memory import peak_rss_gb, reset_peak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("height", type=int)
    parser.add_argument("width", type=int)
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-bench"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    vae = AutoencoderKL.from_pretrained(args.models / "sd21-full", subfolder="vae", torch_dtype=torch.bfloat16).eval()
    latent = torch.randn(1, 4, args.height, args.width, dtype=torch.bfloat16)
    reset_peak()
    start, cpu = peak_rss_gb(), time.process_time()
    with torch.no_grad():
        tiling.vae_decode(vae, latent, tiling.TilingOptions(vae_tile_size=args.tile, max_memory=0.01), mode="bounded")
    tiles = len(tiling._tile_boxes(args.height, args.tile)) * len(tiling._tile_boxes(args.width, args.tile))
    print(f"latent {args.height}x{args.width}: {tiles} tiles, peak above start {peak_rss_gb() - start:.2f} GB, "
          f"CPU {time.process_time() - cpu:.0f} s")


if __name__ == "__main__":
    main()
