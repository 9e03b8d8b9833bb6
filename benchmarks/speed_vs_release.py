"""diffsr against the authors' released inference code: per-image time, throughput and peak memory, one run.

Both sides load the same full-size random weights (SD 2.1-base architecture, written once to --models) and
upscale the same picture x4. Each side runs in its own long-lived worker process (the release needs its own
pinned diffusers/peft/transformers: --release-python), loads once, then the driver asks the two workers for
one image at a time, interleaved (A B, B A, A B ...), so load on a shared machine hits both alike. Per side:
median wall time of --repeats images, throughput (images/s = 1 / median), peak memory of the upscaling
(CPU: resident high-water mark, reset after loading, weights included; CUDA: torch.cuda.max_memory_allocated,
reset after loading and warm-up), and the ratios diffsr / release. Model loading is excluded.

The authors' code is imported from --release-checkout (a local checkout, never copied into this repository)
and driven as their test scripts drive it: OSEDiff's OSEDiff_test with test_osediff.py's per-image steps,
S3Diff's S3Diff (s3diff_tile) + DEResNet with inference_s3diff.py's, StableSR's LatentDiffusionSRTextWT +
AutoencoderKLResi (built from the release's own yaml configs) with the README's StableSR-Turbo command
(sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py --ddpm_steps 4 --dec_w 0.5 --n_samples 1 --colorfix_type wavelet),
CCSR v1's ControlNet + ControlledUnetModel (configs/model/ccsr_stage2.yaml's shapes) with inference_ccsr.py's
process() at its defaults (45 steps, t_max 0.6667, t_min 0.3333, adain). Their tagger (OSEDiff's RAM/DAPE) is off
on both sides: a fixed prompt; OSEDiff and S3Diff take the VAE posterior's mean on both sides (the release's
draw replaced, as in the parity fixtures); StableSR and CCSR use the scripts' seeds, which diffsr reproduces.
So the printed output differences show whether the two did the same work. Where torchvision cannot be imported
(this CPU machine) small stand-ins supply the two transforms their colour fix uses; CUDA calls are mapped to the
CPU with --device cpu. StableSR's and CCSR's text encoder (OpenCLIP in the releases) is the same text tower as
the base's CLIP: its embedding of "" is computed once by diffsr and handed to the release (the parity fixtures'
harnesses in tests/fixtures/stablesr and tests/fixtures/ccsr supply the import stand-ins).

--size takes several cases, run one after the other by the same loaded workers (each with its own warm-up and
table, printed as it ends): SIZE (one image, in memory) or SIZE:N, a folder of N different inputs read from disk
and written as PNG files, as the tools are used on a folder: diffsr through diffsr.batch.upscale_all (`diffsr
upscale`'s loop, which writes one output while the next upscales), the release through its test script's loop
(PIL reads each file, the release upscales it, PIL saves it with its defaults). For a folder, time per image =
the folder's time / N and throughput = N / the folder's time.

    PYTHONPATH=src python benchmarks/speed_vs_release.py --method osediff \\
        --release-checkout /tmp/OSEDiff --release-python /tmp/relvenv/bin/python --size 512 --repeats 3
    ... --device cuda --dtype float16 --release-dtype fp16    # on a GPU (the releases run fp16 there)

The release environment used here: diffusers==0.25.1 peft==0.10.0 transformers==4.45.2
huggingface_hub==0.25.2 tokenizers==0.20.3 numpy<2 (the versions the parity fixtures were made with), and
omegaconf, einops for StableSR and CCSR.

    ... --method stablesr --release-checkout /path/to/IceClear/StableSR     # StableSR-Turbo's 4 DDPM steps
    ... --method ccsr --release-checkout /path/to/csslc/CCSR (its v1 tree)  # 45 steps, t 0.6667 -> 0.3333
    ... --size 512 1024 512:16 --sides diffsr+float16 diffsr+float16+serial-writes release   # 3 cases, one load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # tiling_memory: the full-size base writer and the memory probes

RESULT = "@@speed "  # prefix of the workers' report lines (the release prints its own lines on stdout)
OSEDIFF_PROMPT = "a photo of a city street, clean, high-resolution, 8k"
WEIGHTS = {"ccsr": "ccsr/real-world_ccsr.ckpt", "osediff": "osediff.pkl", "s3diff": "s3diff/s3diff.pkl",
           "stablesr": "stablesr/stablesr_000117.ckpt"}
TEXTS = "empty_prompt.pt"  # the full-size base's embedding of "" (StableSR's and CCSR's release side)
# The README's StableSR-Turbo command (sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py): 4 DDPM steps, dec_w 0.5,
# seed 42, wavelet colour fix; CCSR v1: inference_ccsr.py's --seed.
STABLESR_TURBO = dict(steps=4, fidelity=0.5, color_fix="wavelet")
SEEDS = {"ccsr": 233, "osediff": 0, "s3diff": 0, "stablesr": 42}


# ----------------------------------------------------------------------------------------------- workers

def report(**fields) -> None:
    print(RESULT + json.dumps(fields), flush=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


SIDES = ("'release' or 'diffsr[+dtype][+merged|+unmerged][+winograd|+direct][+compile[=MODE]][+tile_batch=N]"
         "[+max_memory=GB][+channels_last][+serial-writes][+no-prompt-cache]'")


def parse_side(spec: str, args) -> dict:
    """'release', or 'diffsr' with options joined by '+': a dtype (float32, bfloat16, float16), for OSEDiff
    'merged' / 'unmerged' (LoRA; default: --merge-lora, else the library's default), and 'winograd' / 'direct'
    (CPU float32 convolutions; default: the library's, Winograd), 'compile' or 'compile=MODE' (torch.compile;
    MODE default: reduce-overhead on CUDA, default on the CPU), 'tile_batch=N' (denoiser tiles per UNet call),
    'max_memory=GB' (the tiler's working-memory budget; default: from the free device memory),
    'channels_last' (the networks' 4-D weights in channels-last memory order, which the convolutions' outputs
    follow), 'serial-writes' (in folder cases, each output written before the next image upscales, as before
    diffsr.batch wrote in the background) and 'no-prompt-cache' (every prompt encoded for every image, as before
    Backbone.encode_prompt kept its last results)."""
    name, *options = spec.split("+")
    side = {"name": name, "dtype": args.dtype, "merge_lora": args.merge_lora, "winograd": None, "compile": None,
            "serial_writes": False, "tile_batch": None, "channels_last": False, "prompt_cache": True,
            "max_memory": None}
    for option in options:
        key, _, value = option.partition("=")
        if key == "compile":
            side["compile"] = value or ("reduce-overhead" if args.device.startswith("cuda") else "default")
        elif option in ("float32", "bfloat16", "float16"):
            side["dtype"] = option
        elif option in ("merged", "unmerged"):
            side["merge_lora"] = option == "merged"
        elif option in ("winograd", "direct"):
            side["winograd"] = option == "winograd"
        elif key == "tile_batch" and value.isdigit():
            side["tile_batch"] = int(value)
        elif key == "max_memory" and value.replace(".", "", 1).isdigit():
            side["max_memory"] = float(value)
        elif option == "channels_last":
            side["channels_last"] = True
        elif option == "serial-writes":
            side["serial_writes"] = True
        elif option == "no-prompt-cache":
            side["prompt_cache"] = False
        else:
            raise SystemExit(f"speed_vs_release: unknown option {option!r} in side {spec!r}")
    if name not in ("diffsr", "release") or (name == "release" and options):
        raise SystemExit(f"speed_vs_release: a side is {SIDES}, not {spec!r}")
    return side


def diffsr_runner(args):
    """diffsr's public API, as a user calls it: load_upscaler + upscale (preprocess, restore, colour fix); for a
    folder, `diffsr upscale`'s loop. Returns (one image -> output, (inputs, output folder) -> None)."""
    import diffsr

    side = parse_side(args.worker, args)
    base, weights = args.models / "sd21-full", args.models / WEIGHTS[args.method]
    options = {name: side[name] for name in ("winograd", "compile") if side[name] is not None}
    knobs = {}
    if args.method == "osediff":
        if side["merge_lora"] is not None:
            options["merge_lora"] = side["merge_lora"]
        options["tagger"] = "none"
        knobs = {"prompt": OSEDIFF_PROMPT}
    elif args.method == "stablesr":
        knobs = STABLESR_TURBO
    knobs = {**knobs, **{name: side[name] for name in ("tile_batch", "max_memory") if side[name]}}
    upscaler = diffsr.load_upscaler(args.method, base=base, weights=weights, device=args.device,
                                    dtype=side["dtype"], **options)
    if side["channels_last"]:
        import torch

        for net in upscaler.networks():
            net.to(memory_format=torch.channels_last)

    def upscale(image):
        return upscaler.upscale(image, scale=4, seed=SEEDS[args.method], **knobs)
    from diffsr import batch

    if side["serial_writes"]:
        batch.BACKGROUND_WRITE_PIXELS = 0
    if not side["prompt_cache"]:
        from diffsr import backbone

        backbone.PROMPT_CACHE_SIZE = 0

    def run_folder(inputs: list[Path], out: Path) -> None:  # `diffsr upscale`'s loop
        done = batch.upscale_all(batch.plan_outputs(inputs, out, overwrite=True), lambda path, _: upscale(path))
        if done.failures:
            raise SystemExit("\n".join(done.failures))
    return lambda image: upscale(image).rgb, run_folder


def release_folder(run):
    """The release's test-script loop over a folder: PIL reads each file, the release upscales, PIL saves."""
    from PIL import Image

    def run_folder(inputs: list[Path], out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for path in inputs:
            Image.fromarray(run(np.asarray(Image.open(path).convert("RGB")))).save(out / path.name)
    return run_folder


def _release_imports(checkout: Path, device: str) -> None:
    """What the release's imports need here, its code untouched: stand-ins for torchvision where it cannot be
    imported (only ToTensor/ToPILImage are used, by the colour fix) and for BasicSR's compiled ops and logger
    (S3Diff's arch_util imports them, never calls them); 'cuda' mapped to the CPU on a CPU run."""
    import importlib.util

    import torch

    import diffusers, peft, transformers  # noqa: E401,F401  (before any stand-in: they probe for torchvision)

    sys.path.insert(0, str(REPO / "tests" / "fixtures" / "s3diff"))
    from make_parity_fixture import _cpu_only, _stub_modules  # the stand-ins the S3Diff fixture uses

    try:
        import torchvision  # noqa: F401
        have_torchvision = True
    except ImportError:
        have_torchvision = False
    torchvision_modules = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.transforms")}
    _stub_modules()
    if have_torchvision:  # keep the real one
        sys.modules.update({k: v for k, v in torchvision_modules.items() if v is not None})
    else:
        from PIL import Image

        transforms = sys.modules["torchvision.transforms"]

        def to_tensor():  # torchvision.transforms.ToTensor on an 8-bit RGB PIL image
            return lambda picture: torch.from_numpy(np.asarray(picture, np.float32) / 255).permute(2, 0, 1).contiguous()

        def to_pil():  # torchvision.transforms.ToPILImage on a float CHW tensor: mul(255).byte()
            return lambda tensor: Image.fromarray(tensor.mul(255).byte().permute(1, 2, 0).numpy())

        transforms.ToTensor, transforms.ToPILImage = to_tensor, to_pil
    if (checkout / "basicsr").is_dir():  # S3Diff: its arch_util, with the stand-in ops above
        spec = importlib.util.spec_from_file_location("basicsr.archs.arch_util", checkout / "basicsr/archs/arch_util.py")
        arch_util = importlib.util.module_from_spec(spec)
        sys.modules["basicsr.archs.arch_util"] = arch_util
        spec.loader.exec_module(arch_util)
    if device == "cpu":
        _cpu_only()
    # The posterior's mean on both sides (diffsr's default; the release draws from torch's global generator,
    # which diffsr cannot reproduce), so the outputs can be compared; one draw less is no measurable time.
    from diffusers.models.autoencoders import vae

    vae.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean


RELEASE_TILES = dict(vae_encoder_tiled_size=1024, vae_decoder_tiled_size=224, latent_tiled_size=96,
                     latent_tiled_overlap=32)  # OSEDiff's and S3Diff's test scripts' defaults


def release_runner(args):
    """The release's per-image steps as a function of the RGB input (its models loaded once), and its test
    script's loop over a folder."""
    checkout = args.release_checkout.resolve()
    base, weights = args.models / "sd21-full", args.models / WEIGHTS[args.method]
    runners = {"ccsr": release_ccsr, "osediff": release_osediff, "s3diff": release_s3diff,
               "stablesr": release_stablesr}
    run = runners[args.method](args, checkout, base, weights)
    return run, release_folder(run)


def release_osediff(args, checkout: Path, base: Path, weights: Path):
    from argparse import Namespace

    import torch
    from PIL import Image

    _release_imports(checkout, args.device)
    sys.path.insert(0, str(checkout))
    from my_utils.wavelet_color_fix import adain_color_fix
    from osediff import OSEDiff_test
    from torchvision.transforms import ToPILImage, ToTensor

    model = OSEDiff_test(Namespace(pretrained_model_name_or_path=str(base), osediff_path=str(weights),
                                   mixed_precision=args.release_dtype,
                                   merge_and_unload_lora=args.release_merge_lora, **RELEASE_TILES))

    def run(image: np.ndarray) -> np.ndarray:  # test_osediff.py's loop body, the tagger left out
        input_image = Image.fromarray(image)
        ori_width, ori_height = input_image.size
        rscale = 4
        if ori_width < 512 // rscale or ori_height < 512 // rscale:
            scale = (512 // rscale) / min(ori_width, ori_height)
            input_image = input_image.resize((int(scale * ori_width), int(scale * ori_height)))
        input_image = input_image.resize((input_image.size[0] * rscale, input_image.size[1] * rscale))
        new_width, new_height = input_image.width - input_image.width % 8, input_image.height - input_image.height % 8
        input_image = input_image.resize((new_width, new_height), Image.LANCZOS)
        lq = ToTensor()(input_image).unsqueeze(0).to(args.device)
        with torch.no_grad():
            output_image = model(lq * 2 - 1, prompt=OSEDIFF_PROMPT)
            output_pil = ToPILImage()(output_image[0].cpu() * 0.5 + 0.5)
            output_pil = adain_color_fix(target=output_pil, source=input_image)
        return np.asarray(output_pil)
    return run


def release_s3diff(args, checkout: Path, base: Path, weights: Path):
    from argparse import Namespace

    import torch
    import torch.nn.functional as F
    from PIL import Image

    _release_imports(checkout, args.device)
    half = args.release_dtype == "fp16"
    sys.path[:0] = [str(checkout / "src"), str(checkout)]
    from de_net import DEResNet
    from s3diff_tile import S3Diff
    from torchvision.transforms import ToPILImage, ToTensor
    from utils.wavelet_color import wavelet_color_fix

    dtype = torch.float16 if half else torch.float32
    net_de = DEResNet(num_in_ch=3, num_degradation=2)
    net_de.load_model(str(weights.parent / "de_net.pth"))
    net_de.eval()
    net_sr = S3Diff(lora_rank_unet=32, lora_rank_vae=16, sd_path=str(base), pretrained_path=str(weights),
                    args=Namespace(**RELEASE_TILES))
    net_sr.set_eval()
    net_sr.to(args.device, dtype=dtype)
    net_de.to(args.device, dtype=dtype)
    # accelerate's prepare() wraps the forward passes in autocast when mixed precision is on
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=half and args.device.startswith("cuda"))
    positive = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural "
                "lighting.")
    negative = ("oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, "
                "oversmooth")  # parse_args_paired_testing's defaults

    def run(image: np.ndarray) -> np.ndarray:  # inference_s3diff.py's loop body
        im_lr = ToTensor()(Image.fromarray(image)).unsqueeze(0).to(args.device).float()
        ori_h, ori_w = im_lr.shape[2:]
        im_lr_resize = F.interpolate(im_lr, size=(ori_h * 4, ori_w * 4), mode="bilinear", align_corners=False)
        im_lr_resize_norm = torch.clamp(im_lr_resize.contiguous() * 2 - 1.0, -1.0, 1.0)
        resize_h, resize_w = im_lr_resize_norm.shape[2:]
        pad_h, pad_w = (-resize_h) % 64, (-resize_w) % 64
        im_lr_resize_norm = F.pad(im_lr_resize_norm, pad=(0, pad_w, 0, pad_h), mode="reflect")
        with torch.no_grad(), autocast:
            deg_score = net_de(im_lr)
            x_tgt_pred = net_sr(im_lr_resize_norm, deg_score, pos_prompt=[positive], neg_prompt=[negative])
            x_tgt_pred = x_tgt_pred[:, :, :resize_h, :resize_w]
            out_img = (x_tgt_pred * 0.5 + 0.5).cpu().detach()
        output_pil = ToPILImage()(out_img[0].float())
        output_pil = wavelet_color_fix(output_pil, ToPILImage()(im_lr_resize[0].cpu().detach()))
        return np.asarray(output_pil)
    return run


def release_stablesr(args, checkout: Path, base: Path, weights: Path):
    """sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py's per-image lines (tests/fixtures/stablesr/make_release_runs.py's
    release_run) with the README's StableSR-Turbo options (--ddpm_steps 4 --dec_w 0.5 --seed 42 --n_samples 1
    --colorfix_type wavelet --upscale 4; --input_size 512 and --tile_overlap 32 at their defaults). Images up to
    --vqgantile_size (1280 px) are one piece, as here."""
    import torch

    os.environ.update(STABLESR_SRC=str(checkout), STABLESR_GROUPS="32")  # the release's GroupNorm32
    sys.path.insert(0, str(REPO / "tests" / "fixtures" / "stablesr"))
    import make_reference as harness  # the import stand-ins (Lightning, torchvision, OpenCLIP ...)
    import make_release_runs as script
    from omegaconf import OmegaConf

    torch.set_num_threads(args.threads)  # the fixture harness sets one thread
    configs = OmegaConf.load(checkout / "configs/stableSRNew/v2-finetune_text_T_512.yaml")
    configs.model.params.cond_stage_config = {"target": "harness.NullText"}  # the text embedding is given
    vq_config = OmegaConf.load(checkout / "configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml").model
    vq_config.params.lossconfig = {"target": "torch.nn.Identity"}  # LPIPS + discriminator: training only
    harness.MODEL, harness.VQ = configs.model, vq_config
    model, vq, _ = script.load_models(weights.parent)  # randn_like in the contiguous order, as on the GPU
    script.INPUT_SIZE, script.TILE_OVERLAP, script.N_SAMPLES = 512, 32, 1  # the script's defaults, Turbo's 1
    texts = {"empty": torch.load(args.models / TEXTS)}  # model.cond_stage_model([""] * n_samples)
    turbo = STABLESR_TURBO

    def run(image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out, _, _ = script.release_run(model, vq, image, texts, "ddpm", SEEDS["stablesr"], 4.0, turbo["steps"],
                                           None, turbo["fidelity"], turbo["color_fix"])
        return out.astype(np.uint8)  # as the script saves it
    return run


def release_ccsr(args, checkout: Path, base: Path, weights: Path):
    """inference_ccsr.py's main() and process() for one image at the script's defaults (45 steps, t_max 0.6667,
    t_min 0.3333, adain colour fix, seed 233, no tiling: tests/fixtures/ccsr/make_v1_release_run.py's process),
    with configs/model/ccsr_stage2.yaml's network shapes."""
    import torch

    os.environ["CCSR_SRC"] = str(checkout)
    sys.path.insert(0, str(REPO / "tests" / "fixtures" / "ccsr"))
    import make_v1_release_run as harness  # the import stand-ins and a ControlLDM holder without Lightning
    from omegaconf import OmegaConf

    config = OmegaConf.load(checkout / "configs/model/ccsr_stage2.yaml").params
    unet = OmegaConf.to_container(config.unet_config.params)
    del unet["out_channels"]  # the holder adds it (ControlNet: hint_channels)
    harness.UNET, harness.GROUPS = unet, 32  # the release's GroupNorm32
    harness.DDCONFIG = OmegaConf.to_container(config.first_stage_config.params.ddconfig)
    model, _ = harness.build(weights.parent, {"empty": torch.load(args.models / TEXTS)})
    assert harness.SEED == SEEDS["ccsr"]
    return lambda image: harness.process(model, image)["pred"]


def parse_case(text: str) -> tuple[int, int]:
    """'512' -> (512, 0): one image of 512 px output; '512:16' -> (512, 16): a folder of 16 such inputs."""
    size, _, count = text.partition(":")
    if not size.isdigit() or not (count.isdigit() if count else True) or int(size) < 8 or count == "0":
        raise argparse.ArgumentTypeError(f"a case is SIZE or SIZE:N (a folder of N inputs), not {text!r}")
    return int(size), int(count or 0)


def case_folder(out: Path, size: int, count: int) -> Path:
    return out / f"inputs-{size}-{count}"


def write_folder(folder: Path, size: int, count: int) -> None:
    """`count` different inputs of `size` px (the same smooth picture, shifted), as PNG files."""
    from PIL import Image

    from tiling_memory import smooth_image

    folder.mkdir()
    for index in range(count):
        Image.fromarray(np.roll(smooth_image(size), 7 * index, axis=1)).save(folder / f"{index:03d}.png")


def worker(args) -> None:
    """Load one side, warm each case up, then upscale one case (one picture or one folder) per 'run CASE' line on
    stdin, reporting time per image and peak memory."""
    import torch
    from PIL import Image

    from tiling_memory import peak_rss_gb, reset_peak, smooth_image

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    start = time.perf_counter()
    one, folder = release_runner(args) if args.worker == "release" else diffsr_runner(args)

    def case_run(size: int, count: int):  # () -> the case's (last) output
        if not count:
            image = smooth_image(size // 4)
            return lambda: one(image)
        inputs = sorted(case_folder(args.out, size, count).glob("*.png"))
        out = args.out / f"outputs-{args.worker}-{size}-{count}"

        def run_folder():
            folder(inputs, out)
            return np.asarray(Image.open(out / inputs[-1].name))
        return run_folder

    runs = [case_run(*case) for case in args.size]
    warmup_seconds = []  # per case, each warm-up's time: with compile, the first pays the compilation
    for run in runs:
        warmup_seconds.append([])
        for _ in range(args.warmup):
            started = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            warmup_seconds[-1].append(time.perf_counter() - started)
    if cuda:
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated() / 2**30
    else:
        loaded = peak_rss_gb()
    report(event="ready", load_seconds=time.perf_counter() - start, loaded_gb=loaded, warmup_seconds=warmup_seconds)
    for line in sys.stdin:
        command, _, case = line.strip().partition(" ")
        if command != "run":
            break
        case = int(case)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        output = runs[case]()
        if cuda:
            torch.cuda.synchronize()
        images = args.size[case][1] or 1  # times per image
        seconds, cpu = (time.perf_counter() - start) / images, (cpu_seconds() - cpu_start) / images
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gb()
        np.save(args.out / f"{args.worker}-{case}.npy", np.asarray(output))  # compared by the driver
        report(event="image", seconds=seconds, cpu_seconds=cpu, peak_gb=peak, shape=list(np.shape(output)))


# ------------------------------------------------------------------------------------------------ driver

def worker_env(side: str, args) -> dict:
    """diffsr: this checkout's src before the driver's path; the release: only --release-path (its pinned
    packages), never diffsr's."""
    path = args.release_path if side == "release" else [REPO / "src", os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, map(str, path))))


def start_worker(side: str, args, python: str) -> subprocess.Popen:
    command = [python, str(Path(__file__).resolve()), "--worker", side] + args.worker_args
    env = worker_env(side, args)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                               stderr=None if args.verbose else subprocess.DEVNULL)
    return process


def read_report(process: subprocess.Popen, side: str, verbose: bool) -> dict:
    for line in process.stdout:
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
        if verbose:
            print(f"  [{side}] {line.rstrip()}", file=sys.stderr)
    raise SystemExit(f"speed_vs_release: the {side} worker stopped (exit {process.wait()}); rerun with --verbose")


def versions(python: str, env: dict | None = None) -> str:
    code = ("import importlib.metadata as m\nout=[]\nfor p in ('torch','diffusers','peft','transformers'):\n"
            " try: out.append(p+' '+m.version(p))\n except Exception: pass\nprint(', '.join(out))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=env).stdout.strip()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def git_commit() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+changes" if dirty else "")


def ensure_models(models: Path, method: str) -> None:
    from diffsr.testing import _prefix_text_encoder_keys, _write_tiny_stablesr, make_tiny_weights
    from tiling_memory import write_full_size_base

    base = models / "sd21-full"
    if not (base / "unet" / "diffusion_pytorch_model.safetensors").exists():
        write_full_size_base(base)
        _prefix_text_encoder_keys(base / "text_encoder" / "model.safetensors")  # older transformers need it
    weights = models / WEIGHTS[method]
    if not weights.exists() and method == "stablesr":  # the release's time-aware encoder is 256 wide, not 320
        weights.parent.mkdir(parents=True, exist_ok=True)
        _write_tiny_stablesr(base, weights, encoder_channels=256)
    elif not weights.exists():
        make_tiny_weights(method, base, weights)
    if method in ("ccsr", "stablesr") and not (models / TEXTS).exists():
        import torch

        from diffsr.backbone import load_backbone

        with torch.no_grad():
            torch.save(load_backbone(base).encode_prompt([""]), models / TEXTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(WEIGHTS), default="osediff")
    parser.add_argument("--release-checkout", type=Path,
                        help="local checkout of the authors' repo (needed with a 'release' side)")
    parser.add_argument("--release-python", default=sys.executable,
                        help="Python of an environment with the release's pinned versions")
    parser.add_argument("--release-path", type=Path, nargs="*", default=[],
                        help="folders put on the release worker's PYTHONPATH (e.g. its pinned packages installed "
                             "with pip --target), instead of the driver's")
    parser.add_argument("--models", type=Path, default=Path("/tmp/diffsr-speed-models"),
                        help="full-size random weights, written here once")
    parser.add_argument("--size", type=parse_case, nargs="+", default=[(512, 0)], metavar="SIZE[:N]",
                        help="cases, each timed in turn by the same workers: output size in px (input: size/4, "
                             "square); SIZE:N, a folder of N such inputs read from and written to disk (PNG)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case per side (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed runs of each case per side after loading (default: 1 "
                                                   "on CUDA, 0 on the CPU where one image takes tens of seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="diffsr's dtype")
    parser.add_argument("--release-dtype", default="fp32", choices=["fp32", "fp16"],
                        help="the release's precision (its scripts: --mixed_precision fp16 on GPU)")
    parser.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=None,
                        help="diffsr OSEDiff: merge the LoRA into the base weights at load (default: the library's)")
    parser.add_argument("--release-merge-lora", action=argparse.BooleanOptionalAction, default=False,
                        help="OSEDiff release: --merge_and_unload_lora (off in test_osediff.py)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sides", nargs="+", default=["diffsr", "release"],
                        help=f"what runs, interleaved: {SIDES} "
                             "(e.g. diffsr+bfloat16, diffsr+float16+compile; see parse_side); ratios and output "
                             "differences are against the last one. A compiled side wants --warmup 2 or more (its "
                             "first images compile)")
    parser.add_argument("--verbose", action="store_true", help="show the workers' own output on stderr")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 1 if args.device.startswith("cuda") else 0
    if args.worker:
        return worker(args)
    if "release" in args.sides and args.release_checkout is None:
        parser.error("a 'release' side needs --release-checkout")
    if args.method in ("ccsr", "stablesr") and (args.device != "cpu" or args.release_dtype != "fp32"):
        raise SystemExit(f"speed_vs_release: the {args.method} release side is driven on the CPU in fp32 only "
                         f"(its harness builds the networks without Lightning and keeps them on the CPU)")

    import tempfile

    ensure_models(args.models, args.method)
    out = Path(tempfile.mkdtemp(prefix="speed_vs_release_"))
    for size, count in args.size:
        if count and not case_folder(out, size, count).exists():
            write_folder(case_folder(out, size, count), size // 4, count)
    args.worker_args = ["--method", args.method, "--release-checkout", str(args.release_checkout or ""), "--models",
                        str(args.models), "--warmup", str(args.warmup), "--device", args.device, "--dtype",
                        args.dtype, "--release-dtype", args.release_dtype, "--threads", str(args.threads),
                        "--out", str(out), "--release-merge-lora" if args.release_merge_lora else
                        "--no-release-merge-lora", "--size", *(case_name(*case) for case in args.size)]
    if args.merge_lora is not None:
        args.worker_args.append("--merge-lora" if args.merge_lora else "--no-merge-lora")
    pythons = {side: args.release_python if side == "release" else sys.executable for side in args.sides}
    labels = {}
    for spec in args.sides:
        side = parse_side(spec, args)
        if spec == "release":
            merged = " merged LoRA" if args.release_merge_lora and args.method == "osediff" else ""
            labels[spec] = f"release {args.release_dtype}{merged}"
        else:
            merge = side["merge_lora"]
            merged = "" if args.method != "osediff" or merge is None else " merged LoRA" if merge else " unmerged LoRA"
            conv = {None: "", True: " winograd", False: " direct conv"}[side["winograd"]]
            compiled = f" compiled ({side['compile']})" if side["compile"] else ""
            serial = " serial writes" if side["serial_writes"] else ""
            batched = f" {side['tile_batch']} tiles per call" if side["tile_batch"] else ""
            batched += f" max_memory {side['max_memory']:g} GB" if side["max_memory"] else ""
            layout = " channels-last" if side["channels_last"] else ""
            uncached = "" if side["prompt_cache"] else " no prompt cache"
            labels[spec] = f"diffsr {side['dtype']}{merged}{conv}{compiled}{batched}{layout}{serial}{uncached}"
    cuda = args.device.startswith("cuda")
    cases = ", ".join(case_name(*case) for case in args.size)
    print(f"# speed_vs_release {args.method} x4, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, diffsr "
          f"{git_commit()}, {device_name(args.device)}, {args.threads} threads, random weights from {args.models} "
          f"(where there were none, ensure_models wrote full-size ones: SD 2.1-base architecture), fixed prompt "
          f"(no tagger); cases {cases}, each run {args.repeats} times per side, sides interleaved, after "
          f"{args.warmup} warm-up run(s)")
    for side in args.sides:
        print(f"# {labels[side]}: {versions(pythons[side], worker_env(side, args))}")
    workers, ready = {}, {}
    # A run cut by `timeout` (benchmarks/gpu/run_speed.sh) stops its workers too, not leaving them on the device.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    finished = False
    try:
        for side in args.sides:  # one at a time: the loads do not compete
            workers[side] = start_worker(side, args, pythons[side])
            ready[side] = read_report(workers[side], side, args.verbose)
            print(f"# {labels[side]}: loaded in {ready[side]['load_seconds']:.1f} s (warm-up included)", flush=True)
        for index, case in enumerate(args.size):
            times = time_case(workers, index, case, args, labels)
            print_case(index, case, times, ready, labels, out, cuda)
        finished = True
    finally:
        for process in workers.values():
            if process.poll() is None and finished:
                process.stdin.close()
                process.wait(timeout=120)
            elif process.poll() is None:
                process.kill()


def case_name(size: int, count: int) -> str:
    return f"{size}:{count}" if count else str(size)


def time_case(workers: dict, index: int, case: tuple[int, int], args, labels: dict) -> dict[str, list[dict]]:
    """Each side's reports of --repeats runs of one case, interleaved (A B, B A, ...)."""
    times = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        order = args.sides if repeat % 2 == 0 else args.sides[::-1]
        for side in order:
            workers[side].stdin.write(f"run {index}\n")
            workers[side].stdin.flush()
            result = read_report(workers[side], side, args.verbose)
            times[side].append(result)
            unit = f"folder {repeat + 1}, per image" if case[1] else f"image {repeat + 1}"
            print(f"#   {case_name(*case)}: {labels[side]}: {unit}: {result['seconds']:.3f} s wall, "
                  f"{result['cpu_seconds']:.1f} s CPU, peak {result['peak_gb']:.2f} GB", flush=True)
    return times


def print_case(index: int, case: tuple[int, int], times: dict, ready: dict, labels: dict, out: Path,
               cuda: bool) -> None:
    """One case's table, its warm-up times and the output differences against the last side."""
    size, count = case
    sides = list(times)
    what = (f"folders of {count} inputs read from disk and written as PNG (time per image = folder time / {count})"
            if count else "one image in memory")
    print(f"\n## {size} px output, {what}\n")
    peak_name = "peak GPU GB (max allocated)" if cuda else "peak RSS GB"
    print(f"| side | s / image (median) | all s | images / s | CPU s / image (median) | {peak_name} | loaded GB | "
          f"time ratio | throughput ratio | CPU time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {side: (statistics.median(r["seconds"] for r in times[side]),
                      statistics.median(r["cpu_seconds"] for r in times[side]),
                      max(r["peak_gb"] for r in times[side])) for side in sides}
    reference = sides[-1]
    ref_seconds, ref_cpu, ref_peak = summary[reference]
    for side in sides:
        seconds, cpu, peak = summary[side]
        every = ", ".join(f"{r['seconds']:.3f}" for r in times[side])
        print(f"| {labels[side]} | {seconds:.3f} | {every} | {1 / seconds:.3f} | {cpu:.1f} | {peak:.2f} | "
              f"{ready[side]['loaded_gb']:.2f} | {seconds / ref_seconds:.2f}x | {ref_seconds / seconds:.2f}x | "
              f"{cpu / ref_cpu:.2f}x | {peak / ref_peak:.2f}x |")
    print(f"\n# ratios: each side / {labels[reference]} (times, memory) and {labels[reference]} / each side "
          f"(throughput); CPU time: user + system of the worker process (on a loaded machine, less affected by "
          f"the neighbours than wall time)")
    for side in sides:
        warmup = ", ".join(f"{seconds:.3f}" for seconds in ready[side]["warmup_seconds"][index])
        if warmup:
            print(f"# {labels[side]}: warm-up {'folders' if count else 'images'} {warmup} s")
    last = np.load(out / f"{reference}-{index}.npy").astype(np.int16)
    for side in sides[:-1]:
        output = np.load(out / f"{side}-{index}.npy").astype(np.int16)
        if output.shape == last.shape:
            difference = np.abs(output - last)
            print(f"# output of {labels[side]} against {labels[reference]}, {output.shape}: mean |difference| "
                  f"{difference.mean():.3f}, max {difference.max()} (8-bit levels)")
        else:
            print(f"# output shapes differ: {labels[side]} {output.shape}, {labels[reference]} {last.shape}")
    print(flush=True)


if __name__ == "__main__":
    main()
