"""Peak GPU memory and iterations per second of OSEDiff and S3Diff training at 512-px crops, full-size SD 2.1
architecture (random weights), batch 1 and 4.

Each configuration runs in a fresh subprocess through diffsr's own training step (diffsr.training.loop.run_step)
on random batches. diffsr's recipe (bf16 autocast, frozen weights stored in bf16, gradient checkpointing) is
compared, in the same run, with the authors' recipe as released (fp16 autocast with every weight in float32,
no gradient checkpointing; for OSEDiff also a separate frozen teacher UNet, which we fold into the regularizer).
Goal: OSEDiff batch 1 under 16 GB (the authors' recipe needs about 24 GB).

    python benchmarks/train_gpu_memory.py                     # on a CUDA machine
    python benchmarks/train_gpu_memory.py --tiny --device cpu  # smoke test of the script itself (tiny models)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).parent


def write_models(folder: Path, tiny: bool) -> dict:
    """Base (full-size SD 2.1 architecture unless tiny), S3Diff estimator, DINO ViT-B/16 shape, LPIPS files."""
    from transformers import ViTConfig, ViTModel

    from diffsr.testing import make_tiny_base, make_tiny_weights

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests" / "fixtures" / "metrics"))
    import synthetic  # the random LPIPS weight files the tests use
    from tiling_memory import write_full_size_base

    base = folder / ("sd21-tiny" if tiny else "sd21-full")
    if not (base / "unet").exists():
        make_tiny_base(base) if tiny else write_full_size_base(base)
    s3diff = folder / "s3diff" / "s3diff.pkl"
    if not s3diff.exists():
        make_tiny_weights("s3diff", base, s3diff)  # only its de_net.pth is used: training starts from scratch
    dino = folder / ("dino-tiny" if tiny else "dino-vitb16")
    if not dino.exists():
        size = dict(hidden_size=16, num_hidden_layers=12, num_attention_heads=2, intermediate_size=32) if tiny else {}
        ViTModel(ViTConfig(patch_size=16, image_size=224, layer_norm_eps=1e-6, **size), add_pooling_layer=False).save_pretrained(dino)
    lpips = folder / "lpips"
    if not lpips.exists():
        lpips.mkdir(parents=True)
        synthetic.write_diffsr_weight_files(lpips)
    return {"base": base, "de_net": s3diff.parent / "de_net.pth", "dino": dino, "lpips": lpips}


def child(args) -> dict:
    from accelerate import Accelerator

    from diffsr.training import trainer_class
    from diffsr.training.loop import Batch, run_step

    paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
    ours = args.recipe == "diffsr"
    on_cpu = args.device == "cpu"  # the --tiny smoke test: fp16 autocast needs a GPU
    accelerator = Accelerator(mixed_precision="bf16" if ours or on_cpu else "fp16", cpu=on_cpu)
    method_args = {"lpips_weights": paths["lpips"]}
    if args.method == "s3diff":
        method_args.update(de_net=paths["de_net"], dino=paths["dino"])
    trainer = trainer_class(args.method)(base=paths["base"], **method_args)
    if ours:
        trainer.enable_gradient_checkpointing()
        trainer.cast_frozen(torch.bfloat16)
    elif args.method == "osediff":
        import copy

        # OSEDiff_reg holds its own frozen teacher UNet and text encoder (in the autocast dtype) and VAE (float32).
        half = torch.float16 if not on_cpu else torch.bfloat16
        trainer.release_teacher = copy.deepcopy(trainer.regularizer_unet).to(half)
        trainer.release_text_encoder = copy.deepcopy(trainer.text_encoder).to(half)
        trainer.release_vae = copy.deepcopy(trainer.vae)
    groups = trainer.parameter_groups()
    optimizers = {name: torch.optim.AdamW(params, lr=1e-5) for name, params in groups.items()}
    model, *prepared = accelerator.prepare(trainer, *optimizers.values())
    optimizers = dict(zip(optimizers, prepared))
    trainer = accelerator.unwrap_model(model)
    model.train()
    crop, device = args.crop, accelerator.device
    generator = torch.Generator().manual_seed(0)

    def batch():
        hr = torch.rand(args.batch, 3, crop, crop, generator=generator)
        return [Batch({"hr": hr.to(device), "lr": torch.nn.functional.avg_pool2d(hr, 4).to(device)})]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        run_step(accelerator, model, trainer, batch(), optimizers, groups, 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.iterations):
        run_step(accelerator, model, trainer, batch(), optimizers, groups, 1.0)
    sync()
    seconds = (time.perf_counter() - start) / args.iterations
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"method": args.method, "recipe": args.recipe, "batch": args.batch, "seconds_per_it": seconds,
            "it_per_s": 1 / seconds, "peak_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["osediff", "s3diff"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--recipes", nargs="+", default=["release", "diffsr"], help="release first: the baseline")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (checks the script, measures nothing)")
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-train-bench"))
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(child(args)))
        return
    if args.tiny:
        args.crop = min(args.crop, 64)
    paths = {k: str(v) for k, v in write_models(args.models, args.tiny).items()}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
    print(f"# diffsr training benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {device_name}, torch "
          f"{torch.__version__}, {args.crop}-px crops, {'TINY models' if args.tiny else 'SD 2.1 architecture'}, "
          f"{args.iterations} timed iterations after {args.warmup}")
    print("| method | batch | recipe | it/s | peak GB | memory vs release | speed vs release |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for method in args.methods:
        for batch in args.batches:
            rows = {}
            for recipe in args.recipes:
                command = [sys.executable, __file__, "--method", method, "--recipe", recipe, "--batch", str(batch),
                           "--crop", str(args.crop), "--iterations", str(args.iterations), "--warmup",
                           str(args.warmup), "--device", args.device, "--paths", json.dumps(paths)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
                    print(f"| {method} | {batch} | {recipe} | failed: {reason} |", flush=True)
                    continue
                rows[recipe] = row = json.loads(done.stdout.strip().splitlines()[-1])
                base = rows.get("release")
                memory = f"{row['peak_gb'] / base['peak_gb']:.2f}" if base and recipe != "release" else "-"
                speed = f"{row['it_per_s'] / base['it_per_s']:.2f}" if base and recipe != "release" else "-"
                print(f"| {method} | {batch} | {recipe} | {row['it_per_s']:.2f} | {row['peak_gb']:.2f} | {memory} | "
                      f"{speed} |", flush=True)


if __name__ == "__main__":
    main()
