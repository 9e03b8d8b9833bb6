"""Peak memory and time of x4 upscaling (OSEDiff by default) at growing output sizes, full-size SD 2.1 architecture.

Random weights in the real shapes (written once to --models). Each size runs in a fresh subprocess; its peak
resident memory (VmHWM) is reset after loading the model, so the peak is that of the upscaling itself
(weights included). Ratios are against the 1024 px run (CPU time, since the machine may be shared):
memory should stay flat once the image is larger than a tile, time should grow with the pixel count.

    PYTHONPATH=src python benchmarks/tiling_memory.py --sizes 512 1024 2048 4096 --max-memory 3
    PYTHONPATH=src python benchmarks/tiling_memory.py --device cuda --dtype bfloat16   # peak GPU memory instead
    PYTHONPATH=src python benchmarks/tiling_memory.py --device cuda --method stablesr  # also s3diff, ccsr

On a GPU the peak is torch's peak allocated GPU memory (weights included) and time is wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

BASELINE = 1024
# Each method's weights (random, in the release format) and the knobs of its run: the multi-step methods take
# few steps, since the memory and the time per step are what is measured.
WEIGHTS = {"osediff": "osediff.pkl", "s3diff": "s3diff/s3diff.pkl", "stablesr": "stablesr/stablesr_000117.ckpt",
           "ccsr": "ccsr-v2"}
KNOBS = {"osediff": {}, "s3diff": {}, "stablesr": {"steps": 4}, "ccsr": {"steps": 4}}


def write_full_size_base(path: Path) -> None:
    """stabilityai/stable-diffusion-2-1-base's architecture with random weights (tokenizer: the tiny one)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsr.testing import make_tiny_base

    make_tiny_base(path)  # tokenizer, scheduler, model_index; the three networks are replaced below
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    ).save_pretrained(path / "unet")
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).save_pretrained(path / "vae")
    tiny = CLIPTextConfig.from_pretrained(path / "text_encoder")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=tiny.vocab_size, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
        bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id, pad_token_id=0,
    )).save_pretrained(path / "text_encoder")


def smooth_image(size: int) -> np.ndarray:
    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    planes = [127 + 90 * np.sin(x / (5 + 3 * c) + c) * np.cos(y / (7 + 2 * c)) for c in range(3)]
    return (np.stack(planes, axis=2) + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)


def _status_gb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")) / 2**20


def peak_rss_gb() -> float:
    """Peak resident memory since the start or the last reset_peak() (Linux VmHWM)."""
    return _status_gb("VmHWM")


def resident_gb() -> float:
    """Resident memory now (Linux VmRSS)."""
    return _status_gb("VmRSS")


def reset_peak() -> None:
    """Start the peak over from the current resident size, so loading's own peak does not hide the run's."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds() -> float:
    """CPU time of this process: on a shared machine, wall time also measures the neighbours."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args) -> None:
    import diffsr
    from diffsr import tiling

    torch.set_num_threads(args.threads)
    tiling.return_freed_memory()  # as `diffsr` sets it at its entry (the published figures were measured so)
    cuda = args.device.startswith("cuda")
    upscaler = diffsr.load_upscaler(args.method, base=args.models / "sd21-full",
                                    weights=args.models / WEIGHTS[args.method], dtype=args.dtype, device=args.device)
    if cuda:
        torch.cuda.synchronize()
        loading_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**30
    else:
        loading_peak = peak_rss_gb()
        reset_peak()
        loaded = peak_rss_gb()
    options = tiling.TilingOptions(max_memory=args.max_memory)
    vae, unet, dtype = upscaler.backbone.vae, upscaler.backbone.unet, upscaler.dtype
    latent = (args.child // 8, args.child // 8)
    plan = {
        "unet_tile": options.denoiser_tile(96, unet, upscaler.device, dtype),
        "encode": tiling.vae_plan(options, vae, latent, False, upscaler.device, dtype),
        "decode": tiling.vae_plan(options, vae, latent, True, upscaler.device, dtype),
    }
    if cuda:  # a first small run: CUDA's own start-up is not the upscaling's time
        upscaler.upscale(smooth_image(64), scale=4, seed=0, max_memory=args.max_memory, **KNOBS[args.method])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    upscaler.upscale(smooth_image(args.child // 4), scale=4, seed=0, max_memory=args.max_memory, **KNOBS[args.method])
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gb()
    print(json.dumps({"size": args.child, "seconds": seconds, "cpu_seconds": cpu, "peak_gb": peak,
                      "loaded_gb": loaded, "loading_peak_gb": loading_peak, "plan": plan}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--max-memory", type=float, default=3.0, help="working-memory budget, GB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="osediff", choices=sorted(WEIGHTS))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: then the peak is GPU memory, time is wall time")
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-bench"))
    parser.add_argument("--results", type=Path, help="JSON lines of finished sizes: skipped on a rerun, kept in the table")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from diffsr.testing import make_tiny_weights

    base = args.models / "sd21-full"
    if not (base / "unet" / "diffusion_pytorch_model.safetensors").exists():
        write_full_size_base(base)
    if not (args.models / WEIGHTS[args.method]).exists():
        make_tiny_weights(args.method, base, args.models / WEIGHTS[args.method])

    print(f"# diffsr tiling benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.dtype}, max_memory {args.max_memory} GB, {args.method} x4 {KNOBS[args.method] or ''}, "
          f"SD 2.1 architecture (random weights), "
          f"{gpu_name(args.device)}")
    cuda = args.device.startswith("cuda")
    peak, timed = ("peak GPU GB", "wall s") if cuda else ("peak RSS GB", "CPU s")
    print(f"| output px | wall s | CPU s | {peak} | after load GB | peak / peak@1024 | {timed} per MP / same@1024 | plan |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = {}
    if args.results and args.results.exists():
        for line in args.results.read_text().splitlines():
            row = json.loads(line)
            results[row["size"]] = row
    for size in args.sizes:
        if size not in results:
            command = [sys.executable, __file__, "--child", str(size), "--max-memory", str(args.max_memory),
                       "--dtype", args.dtype, "--threads", str(args.threads), "--models", str(args.models),
                       "--device", args.device, "--method", args.method]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
                print(f"| {size} | failed: {last} |", flush=True)
                continue
            results[size] = json.loads(done.stdout.strip().splitlines()[-1])
            if args.results:
                with args.results.open("a") as file:
                    file.write(json.dumps(results[size]) + "\n")
        print_row(results[size], results.get(BASELINE), "seconds" if cuda else "cpu_seconds")


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "no GPU used"


def print_row(row: dict, base_row: dict | None, timed: str) -> None:
    size = row["size"]
    memory_ratio = f"{row['peak_gb'] / base_row['peak_gb']:.2f}" if base_row else "-"
    per_mp = row[timed] / (size * size / 1e6)
    time_ratio = f"{per_mp / (base_row[timed] / (BASELINE * BASELINE / 1e6)):.2f}" if base_row else "-"
    print(f"| {size} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {row['peak_gb']:.2f} | {row['loaded_gb']:.2f} | "
          f"{memory_ratio} | {time_ratio} | {row['plan']} |", flush=True)

if __name__ == "__main__":
    main()
