"""Cost of the bounded VAE mode against the untiled VAE, per megapixel (issue #22: at most 1.25x).

The full-size SD 2.1 VAE architecture (diffusers AutoencoderKL, config written here, random weights: no network)
decodes a latent and encodes an image, untiled and in diffsr's bounded tiled mode, in interleaved repeats
(untiled, bounded, untiled, ...) so that a shared machine's load falls on both alike; prints each run's CPU
seconds (this process: on a shared machine wall time also measures the neighbours) and wall seconds, the median
ratio bounded / untiled, and the bounded result's mean and max abs difference to the untiled one. The bounded
mode runs bands of `--tile` rows, or as many as `--max-memory` allows (its feature maps go to a temporary file).

    PYTHONPATH=src python benchmarks/bounded_vae_cost.py --size 1024 --tile 64 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import time

import torch

SD21_VAE = dict(  # stabilityai/stable-diffusion-2-1 vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215,
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def smooth(shape, seed: int, cells: int = 16) -> torch.Tensor:
    """A smooth random field (bicubic upsampling of a coarse grid), like an image or its latent."""
    coarse = torch.randn((*shape[:-2], cells, cells), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=shape[-2:], mode="bicubic", align_corners=False)


def timed(fn):
    start, cpu = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        out = fn()
    return out, cpu_seconds() - cpu, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side, px")
    parser.add_argument("--tile", type=int, default=64, help="VAE tile (the bounded mode's band rows)")
    parser.add_argument("--max-memory", type=float, default=None,
                        help="GB: the bounded mode's bands follow from this budget instead of --tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--winograd", action=argparse.BooleanOptionalAction, default=True,
                        help="Winograd convolutions, as load_upscaler does on the CPU (default: on)")
    parser.add_argument("--phases", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    parser.add_argument("--command-allocator", action="store_true",
                        help="glibc's allocator as the `diffsr` command sets it (tiling.return_freed_memory)")
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    from diffsr import tiling
    from diffsr.nets.winograd import use_winograd

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.command_allocator and not tiling.return_freed_memory():
        parser.error("--command-allocator: not glibc, or MALLOC_MMAP_THRESHOLD_ is set")
    vae = AutoencoderKL(**SD21_VAE).eval()
    use_winograd([vae], args.winograd)
    options = (tiling.TilingOptions(max_memory=args.max_memory) if args.max_memory is not None
               else tiling.TilingOptions(vae_tile_size=args.tile))
    latent_hw = (args.size // 8, args.size // 8)
    rows = {phase: tiling.vae_plan(options, vae, latent_hw, phase == "decode", "cpu", torch.float32, "bounded")[1]
            for phase in args.phases}
    latent = smooth((1, 4, args.size // 8, args.size // 8), 1)
    image = (smooth((1, 3, args.size, args.size), 2) * 0.5).clamp(-1, 1)
    runs = {
        "decode": {"untiled": lambda: vae.decode(latent).sample,
                   "bounded": lambda: tiling.vae_decode(vae, latent, options, mode="bounded")},
        "encode": {"untiled": lambda: vae.encode(image).latent_dist.mean,
                   "bounded": lambda: tiling.vae_encode(vae, image, options, mode="bounded").mean},
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, float32, {'Winograd' if args.winograd else 'direct'} convolutions, "
          f"{args.threads} thread(s); {args.size} px image "
          f"({args.size // 8} px latent), bounded mode in bands of {rows} rows"
          + (f" (budget {args.max_memory} GB)" if args.max_memory is not None else "")
          + ("; the diffsr command's allocator setting" if args.command_allocator else ""))
    for phase in args.phases:
        seconds = {"untiled": [], "bounded": []}
        outputs = {}
        for repeat in range(args.repeats):
            for mode in ("untiled", "bounded"):
                outputs[mode], cpu, wall = timed(runs[phase][mode])
                seconds[mode].append((cpu, wall))
                print(f"{phase} {mode} run {repeat + 1}: CPU {cpu:.1f} s, wall {wall:.1f} s", flush=True)
        ratio_cpu = statistics.median(b[0] / u[0] for u, b in zip(seconds["untiled"], seconds["bounded"]))
        ratio_wall = statistics.median(b[1] / u[1] for u, b in zip(seconds["untiled"], seconds["bounded"]))
        difference = (outputs["bounded"] - outputs["untiled"]).abs()
        scale = outputs["untiled"].abs().mean().item()
        print(f"{phase}: bounded / untiled median ratio CPU {ratio_cpu:.2f}x, wall {ratio_wall:.2f}x; "
              f"abs difference mean {difference.mean().item():.2e}, max {difference.max().item():.2e} "
              f"(untiled mean abs {scale:.4f})", flush=True)


if __name__ == "__main__":
    main()
