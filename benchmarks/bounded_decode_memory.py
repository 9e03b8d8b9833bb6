"""Resident memory of the bounded VAE decoder right after loading a full-size model, with glibc's default
allocator settings and with `tiling.return_freed_memory()` (issue #3), measured in the same run.

Loading frees large blocks, which raises glibc's mmap threshold to 32 MB; tile-sized buffers then come from
heaps that fragment, and the first decoder tiles peak higher and stay resident. Each setting runs in a fresh
process: OSEDiff (full-size SD 2.1 architecture, random weights, from tiling_memory.py's --models folder)
loaded in bf16, then its VAE decodes a latent in bounded mode.

    PYTHONPATH=src python benchmarks/bounded_decode_memory.py --latent 128 128 --tile 128
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiling_memory import WEIGHTS, cpu_seconds, peak_rss_gb, reset_peak, resident_gb  # noqa: E402


def child(args) -> None:
    import diffsr
    from diffsr import tiling

    torch.set_num_threads(args.threads)
    upscaler = diffsr.load_upscaler("osediff", base=args.models / "sd21-full", weights=args.models / WEIGHTS["osediff"],
                                    dtype="bfloat16", device="cpu")
    if args.child == "returned":
        tiling.return_freed_memory()
    latent = torch.randn(1, 4, *args.latent, dtype=torch.bfloat16)
    reset_peak()
    start, cpu = resident_gb(), cpu_seconds()
    with torch.no_grad():
        tiling.vae_decode(upscaler.backbone.vae, latent, tiling.TilingOptions(vae_tile_size=args.tile), mode="bounded")
    print(json.dumps({"peak": peak_rss_gb() - start, "kept": resident_gb() - start, "cpu": cpu_seconds() - cpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, nargs=2, default=[128, 128], help="latent height and width")
    parser.add_argument("--tile", type=int, default=128, help="decoder tile, latent px")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-bench"))
    parser.add_argument("--child", choices=["default", "returned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not (args.models / "sd21-full").exists():
        sys.exit(f"{args.models}: no full-size models; run benchmarks/tiling_memory.py once to write them")
    print(f"# bounded VAE decode after loading OSEDiff, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"latent {args.latent[0]}x{args.latent[1]}, tile {args.tile}, bf16, {args.threads} threads")
    print("| glibc setting | peak above start GB | still resident after GB | CPU s |\n|---|---|---|---|")
    rows = {}
    for setting in ("default", "returned"):
        done = subprocess.run([sys.executable, __file__, "--child", setting, "--latent", *map(str, args.latent),
                               "--tile", str(args.tile), "--threads", str(args.threads), "--models", str(args.models)],
                              capture_output=True, text=True, check=True)
        rows[setting] = row = json.loads(done.stdout.strip().splitlines()[-1])
        label = "default (dynamic threshold)" if setting == "default" else "return_freed_memory (1 MB)"
        print(f"| {label} | {row['peak']:.2f} | {row['kept']:.2f} | {row['cpu']:.0f} |")
    print(f"peak ratio returned/default: {rows['returned']['peak'] / rows['default']['peak']:.2f}; "
          f"CPU ratio: {rows['returned']['cpu'] / rows['default']['cpu']:.2f}")


if __name__ == "__main__":
    main()
