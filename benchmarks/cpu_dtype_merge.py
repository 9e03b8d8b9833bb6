"""OSEDiff's network on the CPU: LoRA merged or not, float32 / bfloat16 / float16: time and difference to float32.

One process, full-size random weights (SD 2.1-base architecture, the folder speed_vs_release.py writes), the
network part of one image (OSEDiff.restore: prompt encoding, VAE encode, UNet, VAE decode; no colour fix) on
a --size px picture. The configurations run interleaved (A B C D, D C B A, ...) so load on a shared machine
hits them alike; medians of wall and CPU time, ratios to the first configuration, and the largest and mean
difference of each output from the first's, in 8-bit levels. Merging toggles one float32 model's adapters
(peft merge / unmerge), so 'unmerged' and 'merged' are the same weights.

    PYTHONPATH=src python benchmarks/cpu_dtype_merge.py --size 256 --repeats 2
    PYTHONPATH=src python benchmarks/cpu_dtype_merge.py --configs float32+unmerged float32+merged
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_vs_release import WEIGHTS, device_name, ensure_models, git_commit  # noqa: E402
from tiling_memory import smooth_image  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def set_merged(upscaler, merged: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (upscaler.backbone.unet, upscaler.backbone.vae):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and module.merged != merged:
                module.merge() if merged else module.unmerge()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-speed-models"))
    parser.add_argument("--size", type=int, default=256, help="picture size in px (the network runs at this size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+",
                        default=["float32+unmerged", "float32+merged", "bfloat16+merged", "float16+merged"],
                        help="dtype+merged|unmerged; the first is the reference")
    args = parser.parse_args()

    import diffsr

    torch.set_num_threads(args.threads)
    ensure_models(args.models, "osediff")
    configs = [tuple(config.split("+")) for config in args.configs]
    upscalers = {}
    for dtype in dict.fromkeys(dtype for dtype, _ in configs):
        upscalers[dtype] = diffsr.load_upscaler("osediff", base=args.models / "sd21-full",
                                                weights=args.models / WEIGHTS["osediff"], dtype=dtype,
                                                tagger="none", merge_lora=False)
    picture = torch.from_numpy(smooth_image(args.size)).permute(2, 0, 1)[None].float() / 255
    print(f"# cpu_dtype_merge: OSEDiff restore at {args.size} px, {device_name('cpu')}, {args.threads} threads, "
          f"torch {torch.__version__}, diffsr {git_commit()}, full-size random weights, {args.repeats} runs each, "
          f"interleaved")
    times = {config: [] for config in configs}
    outputs = {}
    for repeat in range(args.repeats):
        for config in configs if repeat % 2 == 0 else configs[::-1]:
            dtype, merge = config
            upscaler = upscalers[dtype]
            set_merged(upscaler, merge == "merged")
            start, cpu_start = time.perf_counter(), cpu_seconds()
            with torch.no_grad():
                outputs[config] = upscaler.restore(picture, torch.Generator().manual_seed(0), prompt="a photo").float()
            times[config].append((time.perf_counter() - start, cpu_seconds() - cpu_start))
            print(f"#   {'+'.join(config)}: {times[config][-1][0]:.2f} s wall, {times[config][-1][1]:.1f} s CPU",
                  flush=True)
    reference = configs[0]
    ref_wall = statistics.median(t[0] for t in times[reference])
    ref_cpu = statistics.median(t[1] for t in times[reference])
    print("| configuration | wall s (median) | CPU s (median) | all wall s | wall ratio | CPU ratio | "
          "max diff (8-bit levels) | mean diff (8-bit levels) |")
    print("|---|---|---|---|---|---|---|---|")
    for config in configs:
        wall = statistics.median(t[0] for t in times[config])
        cpu = statistics.median(t[1] for t in times[config])
        difference = (outputs[config] - outputs[reference]).abs() * 255
        print(f"| {'+'.join(config)} | {wall:.2f} | {cpu:.1f} | {', '.join(f'{t[0]:.2f}' for t in times[config])} | "
              f"{wall / ref_wall:.2f}x | {cpu / ref_cpu:.2f}x | {difference.max().item():.3f} | "
              f"{difference.mean().item():.4f} |")


if __name__ == "__main__":
    main()
