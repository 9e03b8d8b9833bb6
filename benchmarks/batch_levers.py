"""Three levers of issue #22 that diffsr has not built, measured before building them: several 512 px images in
one UNet call (a folder's images batched), one image's VAE decode overlapped with the next image's VAE encode (the
two ends of a batch run at once), and OSEDiff's tagger (RAM Swin-L at 384 px) run for the next image while this
one's UNet runs (the tagger off the critical path).

The full-size SD 2.1-base networks (random weights from --models, as speed_vs_release.py writes them) and a
full-size RAM tagging network (random weights, built here), on --device in --dtype. Each lever runs its two sides
interleaved, --repeats times after a warm-up of each; prints the median seconds per image of each side, the
ratio, the max abs difference of the outputs and, on CUDA, each side's peak memory. On the CPU in float32 the
convolutions run by Winograd, as diffsr runs them. On CUDA an overlapped side runs its two networks in two
threads, each on its own stream.

    PYTHONPATH=src python benchmarks/batch_levers.py --models /tmp/speed_models --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_vs_release import device_name, git_commit  # noqa: E402

LEVERS = ("unet-batch", "decode-encode", "tagger")
# RAM Swin-L 384 (the release's config_swinL_384.json and q2l_config.json): the tagging network's sizes
RAM_SWIN = dict(dim=192, patch=4, depths=[2, 2, 18, 2], heads=[6, 12, 24, 48], windows=[12, 12, 12, 12],
                hidden_ratio=4.0)
RAM_HEAD = dict(layers=2, hidden=768, inner=3072)
RAM_LABEL_WIDTH = 512


def full_size_tagger(device, dtype):
    """diffsr's RAM tagger at the release's size, random weights."""
    from diffsr.taggers import tag_list, thresholds
    from diffsr.taggers.ram import RamModel, RamTagger

    torch.manual_seed(0)
    model = RamModel(RAM_SWIN, RAM_HEAD, len(tag_list()), RAM_LABEL_WIDTH, RAM_SWIN["dim"] * 8)
    with torch.no_grad():
        model.label_embed.normal_()
    return RamTagger(model, tag_list(), thresholds(), device, dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device):
    """(seconds, output, peak bytes or None) of run()."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = run()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return time.perf_counter() - start, output, peak


def in_parallel(first, second, device: torch.device):
    """first() in a thread while second() runs here; on CUDA each on its own stream. Returns both outputs."""
    streams = [torch.cuda.Stream(device) for _ in range(2)] if device.type == "cuda" else [None, None]
    outputs = [None, None]

    def call(index, run):
        with torch.no_grad(), (torch.cuda.stream(streams[index]) if streams[index] else nullcontext()):
            outputs[index] = run()

    thread = threading.Thread(target=call, args=(0, first))
    thread.start()
    call(1, second)
    thread.join()
    return outputs


def compare(name: str, sides: dict, images: int, repeats: int, device: torch.device) -> None:
    """Both sides of one lever, interleaved; one table row."""
    (base_name, base_run), (lever_name, lever_run) = sides.items()
    for run in (base_run, lever_run):  # warm-up: allocator, kernels' first use
        timed(run, device)
    times, outputs, peaks = {base_name: [], lever_name: []}, {}, {}
    for repeat in range(repeats):
        order = (base_name, lever_name) if repeat % 2 == 0 else (lever_name, base_name)
        for side in order:
            seconds, outputs[side], peaks[side] = timed(sides[side], device)
            times[side].append(seconds / images)
            print(f"#   {name} {side}: {seconds:.3f} s", flush=True)
    base, lever = statistics.median(times[base_name]), statistics.median(times[lever_name])
    difference = max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs[base_name],
                                                                                outputs[lever_name]))
    memory = (f" | {peaks[base_name] / 2**30:.2f} | {peaks[lever_name] / 2**30:.2f}" if device.type == "cuda"
              else " | - | -")
    print(f"| {name} | {base_name}: {base:.3f} | {lever_name}: {lever:.3f} | {lever / base:.2f}x | "
          f"{difference:.2e}{memory} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-speed-models"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", type=int, default=512, help="image side, px (latent: size / 8)")
    parser.add_argument("--images", type=int, default=2, help="images per UNet call on the batched side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = args.models / "sd21-full"
    if not (base / "unet").is_dir():
        raise SystemExit(f"batch_levers: no full-size base at {base} (speed_vs_release.py writes it)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype).eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype).eval().to(device)
    if device.type == "cpu" and dtype == torch.float32:
        from diffsr.nets.winograd import available, use_winograd

        use_winograd([vae, unet], enabled=available())  # as diffsr's CPU float32 path runs them
    generator = torch.Generator().manual_seed(0)
    side = args.size // 8
    latents = torch.randn((args.images, 4, side, side), generator=generator).to(device, dtype)
    text = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator).to(device, dtype)
    image = (torch.rand((1, 3, args.size, args.size), generator=generator) * 2 - 1).to(device, dtype)

    def unet_call(batch):
        return unet(batch, 999, encoder_hidden_states=text.expand(len(batch), -1, -1)).sample

    def encode():
        return vae.encode(image).latent_dist.mode()

    def decode():
        return vae.decode(latents[:1]).sample

    print(f"# batch_levers {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
          f"{device_name(args.device)}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.dtype}, {args.size} px images / {side} px latents, "
          f"{args.repeats} repeats interleaved after one warm-up each")
    print("| lever | today: s per image (median) | lever: s per image (median) | lever / today | "
          "max abs difference | peak GiB today | peak GiB lever |")
    print("|---|---|---|---|---|---|---|")
    if "unet-batch" in args.levers:
        compare(f"UNet, {args.images} images", {
            "one per call": lambda: [unet_call(latents[i:i + 1]) for i in range(args.images)],
            f"{args.images} per call": lambda: list(unet_call(latents).split(1)),
        }, args.images, args.repeats, device)
    if "decode-encode" in args.levers:
        compare("decode one image, encode the next", {
            "one after the other": lambda: [decode(), encode()],
            "overlapped": lambda: in_parallel(decode, encode, device),
        }, 1, args.repeats, device)
    if "tagger" in args.levers:
        tagger = full_size_tagger(device, dtype)
        pixels = (image[:1].float() + 1) / 2

        def tag():
            return tagger.logits(pixels)

        compare("tag the next image, denoise this one", {
            "one after the other": lambda: [tag(), unet_call(latents[:1])],
            "overlapped": lambda: in_parallel(tag, lambda: unet_call(latents[:1]), device),
        }, 1, args.repeats, device)
        alone = {name: statistics.median(timed(run, device)[0] for _ in range(args.repeats))
                 for name, run in (("tagger", tag), ("UNet call", lambda: unet_call(latents[:1])))}
        print("(alone, median s: " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in alone.items()) + ")")

if __name__ == "__main__":
    main()
