"""Pairs per second of the Real-ESRGAN degradation on 512-px HR crops on the CPU: ours (one call for a
batch of 16, per-sample parameters) against the reference's per-sample CPU path, in the same run.

The reference path is Real-ESRGAN's own code: per sample, kernels drawn as its dataset does
(BasicSR's `random_mixed_kernels` / `circular_lowpass_kernel`), then `RealESRGANModel.feed_data`
(USM, both stages, final step) with a batch of one on the CPU. Its files are not part of this repository;
put them in one folder and point REFERENCE at it:

    basicsr/data/degradations.py, basicsr/utils/img_process_util.py, basicsr/utils/diffjpeg.py
        from github.com/XPixelGroup/BasicSR (8d56e3a0)
    realesrgan/models/realesrgan_model.py from github.com/xinntao/Real-ESRGAN (a4abfb29)

    REFERENCE=/work/refs/degradation/src PYTHONPATH=src python benchmarks/bench_degradation.py [--ref-samples 4]

Two settings are timed: with USM sharpening of the HR (Real-ESRGAN's trainer) and without (the diffusion
methods); for the latter the reference's sharpener is replaced by the identity.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffsr.degradation import degrade_batch, load_config

sys.path.insert(0, str(Path(__file__).parent))
from reference_degradation import load_reference, make_model  # noqa: E402


def reference_runner(folder: Path, config, sharpen: bool):
    reference = load_reference(folder)
    degradations = reference.degradations
    s1, s2, final = config.stage1, config.stage2, config.final
    opt = {"resize_prob": s1.resize_probs, "resize_range": s1.resize_range, "gaussian_noise_prob": s1.gaussian_noise_prob,
           "noise_range": s1.noise_sigma, "poisson_scale_range": s1.poisson_scale, "gray_noise_prob": s1.gray_noise_prob,
           "jpeg_range": s1.jpeg_range, "second_blur_prob": s2.blur_prob, "resize_prob2": s2.resize_probs,
           "resize_range2": s2.resize_range, "gaussian_noise_prob2": s2.gaussian_noise_prob, "noise_range2": s2.noise_sigma,
           "poisson_scale_range2": s2.poisson_scale, "gray_noise_prob2": s2.gray_noise_prob, "jpeg_range2": s2.jpeg_range,
           "scale": config.scale, "gt_size": None}
    model = make_model(reference, opt, sharpen)

    def kernel(blur):
        """One kernel as Real-ESRGAN's dataset draws it, padded to 21."""
        size = random.choice(blur.sizes)
        if np.random.uniform() < blur.sinc_prob:
            low, high = blur.sinc_cutoff_small if size < blur.sinc_small_size else blur.sinc_cutoff
            k = degradations.circular_lowpass_kernel(np.random.uniform(low, high), size, pad_to=False)
        else:
            k = degradations.random_mixed_kernels(blur.types, blur.probs, size, blur.sigma, blur.sigma,
                                                  [-math.pi, math.pi], blur.betag, blur.betap, noise_range=None)
        pad = (21 - size) // 2
        return torch.FloatTensor(np.pad(k, ((pad, pad), (pad, pad))))

    def run(hr: torch.Tensor) -> torch.Tensor:
        if np.random.uniform() < final.sinc_prob:
            sinc = torch.FloatTensor(degradations.circular_lowpass_kernel(
                np.random.uniform(*final.sinc_cutoff), random.choice(final.sinc_sizes), pad_to=21))
        else:
            sinc = torch.zeros(21, 21)
            sinc[10, 10] = 1
        data = {"gt": hr[None], "kernel1": kernel(s1.blur)[None], "kernel2": kernel(s2.blur)[None], "sinc_kernel": sinc[None]}
        with torch.no_grad():
            model.feed_data(data)
        return model.lq

    return run


def hr_crops(count: int, size: int = 512) -> torch.Tensor:
    """Natural-looking test crops: smooth colour fields with edges (no data files needed)."""
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(count, 3, size // 32, size // 32, generator=generator)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    stripes = (torch.arange(size) // 7 % 2).float()[None, None, None, :] * 0.3
    return (smooth * 0.7 + stripes).clamp(0, 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="our batch (one call), default 16")
    parser.add_argument("--ref-samples", type=int, default=4, help="samples timed on the reference path (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="batches timed for ours (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1)")
    parser.add_argument("--device", default="cpu", help="device for ours (the reference runs on the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = Path(os.environ.get("REFERENCE", "/work/refs/degradation/src"))

    print(f"# bench_degradation  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, {args.threads} thread(s); "
          f"ours on {args.device}, batch {args.batch}; reference on the CPU, {args.ref_samples} samples one by one; "
          "512-px HR -> 128-px LR")
    hr = hr_crops(args.batch).to(args.device)
    base = load_config("realesrgan_x4")
    for sharpen in (True, False):
        config = load_config({**base.to_dict(), "usm": {"input": sharpen, "target": sharpen}})
        label = "with USM" if sharpen else "without USM"
        degrade_batch(hr[:2], config, torch.Generator().manual_seed(99))  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for repeat in range(args.repeats):
            degrade_batch(hr, config, torch.Generator().manual_seed(repeat))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ours = args.batch * args.repeats / (time.perf_counter() - start)
        line = f"{label:12s} ours {ours:7.2f} pairs/s"
        if reference.is_dir():
            run = reference_runner(reference, config, sharpen)
            random.seed(0), np.random.seed(0), torch.manual_seed(0)
            cpu_hr = hr.cpu()
            run(cpu_hr[0])  # warm-up
            start = time.perf_counter()
            for i in range(args.ref_samples):
                run(cpu_hr[i % args.batch])
            theirs = args.ref_samples / (time.perf_counter() - start)
            line += f" | reference per-sample {theirs:7.2f} pairs/s | ours / reference = {ours / theirs:5.2f}x"
        else:
            line += f" | reference not found at {reference} (set REFERENCE)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
