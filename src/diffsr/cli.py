"""The `diffsr` command line: argument parsing that calls into the library.

Exit codes: 0 success, 1 some inputs failed (the others were written), 2 bad usage or nothing could run.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from diffsr.color import COLOR_FIXES
from diffsr.errors import DiffsrError, UsageError, first_line
from diffsr.images import MAX_INPUT_PIXELS, MAX_OUTPUT_PIXELS, OUTPUT_FORMATS, collect_inputs

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _fail(message: str) -> None:
    print(f"diffsr: error: {message}", file=sys.stderr)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from diffsr.methods import list_methods

    parser.add_argument("--method", default="osediff", help=f"one of: {', '.join(list_methods())} (default osediff)")
    parser.add_argument("--base", help="Stable Diffusion base: a registry name (sd21-base), hub id or local diffusers "
                                       "folder (default: the one the weights were trained on)")
    parser.add_argument("--weights", help="the method's released weights: a registry name (osediff-face, stablesr-turbo, "
                                          "ccsr-v1; see `diffsr weights list`), a file or the CCSR-v2 folder "
                                          "(default: the method's, fetched on first use)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA into the base weights (faster, same output)")
    _add_tagger_options(parser)
    parser.add_argument("--sample-posterior", action="store_true",
                        help="sample the VAE posterior with --seed as the release does (default: its mean)")
    parser.add_argument("--de-net", help="s3diff: degradation estimator weights, a file or registry name "
                                         "(default: s3diff-de-net, or de_net.pth beside a --weights file)")
    parser.add_argument("--cfw-weights", help="StableSR: the CFW autoencoder, a file or registry name (default: "
                                              "stablesr-cfw, or vqgan_cfw_00011.ckpt beside a --weights file)")


def _score(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def _method_knobs(args) -> dict:
    """The method knobs given on the command line (the others keep the method's defaults; a method
    rejects knobs it does not have)."""
    knobs = {name: getattr(args, name) for name in _OPTIONAL_KNOBS if getattr(args, name) is not None}
    if args.degradation_blur is not None or args.degradation_noise is not None:
        knobs["degradation"] = (args.degradation_blur, args.degradation_noise)
    if args.show_degradation:
        knobs["show_degradation"] = True
    return knobs


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--scale", type=float, default=4, help="upscaling factor, 1 to 8 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every random draw (default 0)")
    parser.add_argument("--prompt", help="text prompt (default: the method's; empty for osediff)")
    parser.add_argument("--negative-prompt", help="negative prompt for classifier-free guidance (default: the method's)")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance scale (default: the method's; s3diff 1.07, stablesr 1; 1 = off)")
    parser.add_argument("--t-max", type=float, help="CCSR: where the truncated chain starts, in [0, 1]")
    parser.add_argument("--t-min", type=float, help="CCSR: where the truncated chain stops, in [0, 1), below --t-max")
    parser.add_argument("--degradation-blur", type=_score, help="s3diff: use this blur score in [0, 1] instead of the estimate")
    parser.add_argument("--degradation-noise", type=_score, help="s3diff: use this noise score in [0, 1] instead of the estimate")
    parser.add_argument("--show-degradation", action="store_true", help="s3diff: print each image's degradation scores")
    parser.add_argument("--color-fix", choices=COLOR_FIXES, help="colour correction (default: the method's release default)")
    parser.add_argument("--format", choices=sorted(OUTPUT_FORMATS), help="output type (default: the input's own)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: skip them); an input file is never replaced")
    parser.add_argument("--max-input-megapixels", type=float, default=MAX_INPUT_PIXELS / 1e6, metavar="MP",
                        help="refuse larger inputs, from their header before decoding (default %(default)g)")
    parser.add_argument("--max-output-megapixels", type=float, default=MAX_OUTPUT_PIXELS / 1e6, metavar="MP",
                        help="refuse inputs whose output would be larger (default %(default)g)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    # Multi-step methods (StableSR); left unset, each method uses its release default.
    parser.add_argument("--steps", type=int, help="sampling steps (default: the method's; stablesr 200, 4 for turbo)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], help="StableSR sampler (default ddpm)")
    parser.add_argument("--eta", type=float, help="DDIM noise (default 0: deterministic)")
    parser.add_argument("--fidelity", type=float, help="StableSR CFW weight w in [0, 1] (default 0.5)")
    tiles = parser.add_argument_group("tiling (large images; sizes in latent pixels = 8 image pixels)")
    tiles.add_argument("--tile-size", type=int, help="denoiser tile (default: the method's, shrunk to fit --max-memory)")
    tiles.add_argument("--tile-overlap", type=int, help="overlap of denoiser tiles (default 32)")
    tiles.add_argument("--vae-tile-size", type=int, help="VAE encoder/decoder tile (default 128/224, shrunk to fit)")
    tiles.add_argument("--tile-batch", type=int, help="denoiser tiles per network call (default 1)")
    tiles.add_argument("--max-memory", type=float, help="working-memory budget in GB (default: from the device)")
    tiles.add_argument("--release-gaussian", action="store_true",
                       help="the released code's off-centre tile weights (for parity)")


# Knobs passed to the method only when given.
_OPTIONAL_KNOBS = ("prompt", "negative_prompt", "guidance_scale", "steps", "sampler", "eta", "fidelity", "t_max", "t_min")


def _tiling_knobs(args) -> dict:
    from diffsr.tiling import TILING_KNOBS

    return {name: getattr(args, name) for name in TILING_KNOBS if getattr(args, name) not in (None, False)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsr", description="Real-world image super-resolution with diffusion priors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    upscale = commands.add_parser("upscale", help="upscale images or folders of images")
    upscale.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="image files or folders")
    _add_model_options(upscale)
    _add_run_options(upscale)
    _add_prompt_report_options(upscale)

    upscale.add_argument("--offline", action="store_true",
                         help="use only cached weights, never download (as HF_HUB_OFFLINE=1 does)")
    _add_weights_command(commands)
    _add_tag_command(commands)

    demo = commands.add_parser("demo", help="run the whole pipeline on the bundled example image")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    demo.add_argument("--models", type=Path, default=None,
                      help="where the tiny test model is written (default: ~/.cache/diffsr/tiny)")
    demo.add_argument("--quiet", action="store_true")

    commands.add_parser("methods", help="list the available methods")

    degrade = commands.add_parser("degrade", help="make a paired LR/HR test set with the Real-ESRGAN degradation")
    degrade.add_argument("hr_dir", type=Path, metavar="HR_DIR", help="folder of HR images")
    degrade.add_argument("-o", "--output", required=True, type=Path, help="output folder (hr/, lr/, pairs.json)")
    degrade.add_argument("--config", help="degradation YAML, or a bundled one: realesrgan_x4 / s3diff / osediff_face "
                                          "(default: the Real-ESRGAN x4 settings)")
    degrade.add_argument("--crop", type=int, default=512, help="HR crop size in pixels (default 512)")
    degrade.add_argument("--scale", type=int, help="LR = crop / scale (default: the config's, 4)")
    degrade.add_argument("--count", type=int, default=3000, help="number of pairs (default 3000)")
    degrade.add_argument("--seed", type=int, default=0, help="fixes every pair (default 0)")
    degrade.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    degrade.add_argument("--batch-size", type=int, default=16, help="pairs degraded per call (default 16)")
    degrade.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_evaluation_commands(commands)

    convert = commands.add_parser("convert", help="convert released weights to safetensors (loads faster)")
    convert.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="released weights files")
    convert.add_argument("-o", "--output", required=True, type=Path, help="output folder (IN name, .safetensors)")
    convert.add_argument("--method", default="stablesr", help="the method the files belong to (default stablesr)")
    convert.add_argument("--base", help="Stable Diffusion base the weights are for (default: the method's)")

    train = commands.add_parser("train", help="train or fine-tune a method from a YAML config (also under accelerate launch)")
    train.add_argument("config", type=Path, metavar="CONFIG", help="training config (see configs/train/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set train.steps=100 (YAML value syntax; repeatable)")
    train.add_argument("--no-resume", action="store_true",
                       help="start a new run from step 0 even if output_dir holds checkpoints (they are moved to "
                            "output_dir/checkpoints.old-TIME/)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _add_weights_command(commands) -> None:
    weights = commands.add_parser("weights", help="the registry of released models: list, fetch, verify, path")
    actions = weights.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="name, method, size, cached, verified, licence")
    listing.add_argument("--method", help="only this method's models")
    listing.add_argument("--long", action="store_true", help="also sources, location and notes")
    fetch = actions.add_parser("fetch", help="download and check models (for offline use later)")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="registry names (diffsr weights list)")
    fetch.add_argument("--all", action="store_true", help="every model in the registry")
    fetch.add_argument("--method", action="append", default=[], metavar="M",
                       help="what `diffsr upscale --method M` uses by default (weights, base, extras); repeatable")
    fetch.add_argument("--hub", action="append", default=[], metavar="REPO",
                       help="a Stable Diffusion base by hub id (unchecked), for --base REPO offline")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    verify = actions.add_parser("verify", help="re-hash cached models against the registry")
    verify.add_argument("names", nargs="*", metavar="NAME", help="registry names (default: every cached model)")
    path = actions.add_parser("path", help="print the local path of a cached model (for scripts)")
    path.add_argument("name", metavar="NAME")


def run_weights(args) -> int:
    from diffsr import weights

    try:
        registry = weights.Registry.load()
        if args.action == "list":
            return _list_weights(registry, args.method, args.long)
        if args.action == "path":
            print(weights.path(args.name, registry=registry))
            return EXIT_OK
        if args.action == "verify":
            names = args.names or [name for name, item in registry.items.items() if weights.status(item).cached]
            bad = 0
            for name in names:
                problems = weights.verify(name, registry=registry, progress=True)
                bad += bool(problems)
                print(f"{name}: ok" if not problems else f"{name}: FAILED: " + "; ".join(problems))
            return EXIT_SOME_FAILED if bad else EXIT_OK
        names = list(registry.items) if args.all else list(args.names)
        for method in args.method:
            names += [name for name in weights.needed_by(method, registry) if name not in names]
        if not names and not args.hub:
            raise UsageError("name what to fetch: NAME..., --all, --method M or --hub REPO")
        for name in names:
            registry.get(name)  # every name known before anything is downloaded
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    failed = 0
    for name in names:
        try:
            print(f"{name}: {weights.fetch(name, progress=not args.quiet, registry=registry)}")
        except DiffsrError as error:
            _fail(str(error))
            failed += 1
    for repo in args.hub:
        try:
            print(f"{repo}: {weights.hub_base(repo)}")
        except DiffsrError as error:
            _fail(str(error))
            failed += 1
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _list_weights(registry, method: str | None, long: bool) -> int:
    from diffsr import weights

    rows = [("NAME", "METHOD", "VARIANT", "SIZE", "CACHED", "VERIFIED", "LICENCE")]
    for item in registry.items.values():
        if method and item.method != method and item.name not in weights.needed_by(method, registry):
            continue
        state = weights.status(item)
        rows.append((item.name + (" *" if item.default else ""), item.method or "(base)", item.variant or "",
                     item.size_text, "yes" if state.cached else "no", state.verified, item.licence))
        if long:
            rows.append(("", "", "", "", "", "", f"sources: {', '.join(s.describe() for s in item.sources)}"))
            if state.location:
                rows.append(("", "", "", "", "", "", f"at: {state.location}"))
            if item.note:
                rows.append(("", "", "", "", "", "", f"note: {item.note}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print("* the method's default; verified: yes = matches the published hash, unchecked = none is published",
          file=sys.stderr)
    return EXIT_OK


def _add_metric_options(parser: argparse.ArgumentParser) -> None:
    from diffsr.metrics import DEFAULT_METRICS, list_metrics

    parser.add_argument("--gt", type=Path, help="ground-truth folder (images matched by name)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated, from: {', '.join(list_metrics())} (default %(default)s)")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels cropped from each edge for PSNR/SSIM/NIQE")
    parser.add_argument("--metric-backend", default="auto", choices=["auto", "builtin", "pyiqa"],
                        help="built-in metrics or pyiqa's (auto: built-in where available)")
    parser.add_argument("--metric-weights", type=Path, help="folder with the metric networks' weight files")
    parser.add_argument("--offline", action="store_true", help="never download metric weights")
    parser.add_argument("--metric-device", default=None, help="device for the metrics (default: --device or cpu)")


def _add_evaluation_commands(commands) -> None:
    from diffsr.metrics.evaluate import FORMATS

    evaluate = commands.add_parser("evaluate", help="score result folders against ground truth (PSNR, LPIPS, FID, ...)")
    evaluate.add_argument("sr", nargs="*", type=Path, metavar="SR_DIR",
                          help="result folder; several folders = runs of one method with different seeds (adds G-STD, L-STD)")
    _add_metric_options(evaluate)
    evaluate.add_argument("--format", default="md", choices=FORMATS)
    evaluate.add_argument("-o", "--output", type=Path, help="write the table here (default: print it)")
    evaluate.add_argument("--lr", type=Path, help="with --runs/--seeds: upscale this LR folder N times, then evaluate")
    evaluate.add_argument("--runs", type=int, help="upscale N times with seeds 0..N-1 and report mean, G-STD, L-STD")
    evaluate.add_argument("--seeds", help="comma-separated seeds for the runs (instead of --runs)")
    evaluate.add_argument("--scale", type=float, default=4)
    evaluate.add_argument("--work-dir", type=Path, help="where the runs' images are written (default: a temporary folder)")
    evaluate.add_argument("--quiet", action="store_true")
    _add_model_options(evaluate)

    benchmark = commands.add_parser("benchmark", help="upscale with several methods, evaluate, write tables and an HTML report")
    benchmark.add_argument("--methods", required=True, help="comma-separated methods; 'bicubic' is a baseline")
    benchmark.add_argument("--lr", type=Path, required=True, help="LR input folder")
    benchmark.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    _add_metric_options(benchmark)
    benchmark.add_argument("--weights", action="append", default=[], metavar="METHOD=FILE", help="weights per method")
    benchmark.add_argument("--base", action="append", default=[], metavar="[METHOD=]DIR",
                           help="Stable Diffusion base for all methods, or per method")
    benchmark.add_argument("--de-net", action="append", default=[], metavar="METHOD=FILE",
                           help="degradation estimator weights (S3Diff)")
    benchmark.add_argument("--results", action="append", default=[], metavar="NAME=DIR",
                           help="also include finished results from another tool")
    benchmark.add_argument("--device", default="cpu")
    benchmark.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    benchmark.add_argument("--scale", type=float, default=4)
    benchmark.add_argument("--seed", type=int, default=0)
    benchmark.add_argument("--runs", type=int, default=1, help="runs per method with seeds seed..seed+N-1 (adds G-STD, L-STD)")
    benchmark.add_argument("--dataset", help="dataset name for the papers' reference rows (e.g. DIV2K-Val, RealSR)")
    benchmark.add_argument("--title", default="diffsr benchmark")
    benchmark.add_argument("--quiet", action="store_true")


def _load_options(args) -> dict:
    """The model-loading options given on the command line (_add_model_options), for load_upscaler."""
    given = {"merge_lora": args.merge_lora, "sample_posterior": args.sample_posterior, "tagger": args.tagger,
             "tagger_device": args.tagger_device, "ram_weights": args.ram_weights, "dape_weights": args.dape_weights,
             "de_net": args.de_net, "cfw_weights": args.cfw_weights}
    return {name: value for name, value in given.items() if value}


def run_upscale(args) -> int:
    import diffsr
    from diffsr.batch import plan_outputs, upscale_all
    from diffsr.images import check_output_folder
    from diffsr.methods import get_method
    from diffsr.methods.base import check_scale
    from diffsr.tiling import TilingOptions

    # Whatever would fail every image is found before the model is loaded.
    try:
        method = get_method(args.method)
        check_scale(args.scale)
        TilingOptions.from_knobs(_tiling_knobs(args))  # bad tile sizes are a usage error, before any loading
        limits = {"max_input_pixels": _pixels(args.max_input_megapixels, "--max-input-megapixels"),
                  "max_output_pixels": _pixels(args.max_output_megapixels, "--max-output-megapixels")}
        paths = collect_inputs(args.inputs)
        if not paths:
            raise UsageError(f"no images found in {', '.join(map(str, args.inputs))}")
        check_output_folder(args.output)
        _check_tagger_options(args, method.name)
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE

    plan = plan_outputs(paths, args.output, args.format, args.overwrite)
    for line in plan.refused:
        _fail(line)
    if plan.skipped:
        print(f"skipping {plan.skipped} input(s) whose output already exists (use --overwrite to replace)",
              file=sys.stderr)
    if not plan.jobs:
        return EXIT_SOME_FAILED if plan.refused else EXIT_OK

    try:
        upscaler = diffsr.load_upscaler(method.name, base=args.base, weights=args.weights, device=args.device,
                                        dtype=args.dtype, offline=args.offline or None, progress=not args.quiet,
                                        **_load_options(args))
        # Only the knobs the user gave: the others keep each method's release defaults.
        knobs = {**_method_knobs(args), **_tiling_knobs(args)}
        upscaler.check_arguments(args.scale, args.seed, args.color_fix, knobs)
    except (DiffsrError, TypeError) as error:
        _fail(str(error))
        return EXIT_USAGE

    from tqdm import tqdm

    from diffsr import tiling

    progress = tqdm(plan.jobs, desc=f"{method.name} x{args.scale:g}", unit="image", disable=args.quiet, file=sys.stderr)
    # A second bar counts the denoiser passes of the image in hand (multi-step methods on large images are slow).
    passes = tqdm(desc="denoiser passes", unit="pass", disable=args.quiet, file=sys.stderr, position=1, leave=False)

    def upscale(path):
        passes.reset()
        with tiling.report_passes(passes.update):
            return upscaler.upscale(path, scale=args.scale, seed=args.seed, color_fix=args.color_fix, **limits,
                                    **knobs, **_prompt_report_knobs(args, path, progress.write))

    failures = len(plan.refused)

    def report(kind, line):
        nonlocal failures
        if kind == "error":
            failures += 1
        progress.write(f"diffsr: {kind}: {line}", file=sys.stderr)

    written = upscale_all(progress, upscale, report)
    passes.close()
    if not args.quiet:
        print(f"wrote {written} image(s) to {args.output}" + (f"; {failures} failed" if failures else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


# -- tags and prompts (OSEDiff's DAPE tagger) ------------------------------------------------------------------
def _add_tagger_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tagger", choices=["dape", "ram", "none"],
                        help="osediff: the tagger whose tags lead the prompt (default dape, as released; none: the "
                             "prompt alone); needs ram_swin_large_14m.pth (and DAPE.pth) beside --weights or fetched "
                             "with `diffsr weights fetch ram-swin-large dape`")
    parser.add_argument("--tagger-device", help="run the tagger here, e.g. cpu to save GPU memory (default --device)")
    parser.add_argument("--ram-weights", help="osediff tagger: RAM Swin-L, a file or registry name (default: "
                                              "ram-swin-large, or ram_swin_large_14m.pth beside a --weights file)")
    parser.add_argument("--dape-weights", help="osediff tagger: DAPE's LoRA, a file or registry name (default: dape, "
                                               "or DAPE.pth beside a --weights file)")


def _add_prompt_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show-prompt", action="store_true", help="osediff: print the prompt used for each image")
    parser.add_argument("--save-prompts", action="store_true",
                        help="osediff: write each image's prompt to OUTPUT/txt/NAME.txt, as the release does")


def _check_tagger_options(args, method: str) -> None:
    given = [option for option, value in (("--tagger", args.tagger), ("--tagger-device", args.tagger_device),
                                          ("--ram-weights", args.ram_weights), ("--dape-weights", args.dape_weights),
                                          ("--show-prompt", args.show_prompt), ("--save-prompts", args.save_prompts))
             if value]
    if given and method != "osediff":
        raise UsageError(f"{', '.join(given)}: only osediff prompts its network with image tags")


def _prompt_report_knobs(args, path: Path, show) -> dict:
    """The on_prompt knob that prints (--show-prompt) and/or saves (--save-prompts) the prompt of `path`."""
    if not (args.show_prompt or args.save_prompts):
        return {}
    from diffsr.images import write_atomically

    def on_prompt(prompt: str) -> None:
        if args.show_prompt:
            show(f"{path}: prompt: {prompt}")
        if args.save_prompts:
            write_atomically(args.output / "txt" / f"{path.stem}.txt", lambda file: file.write(prompt.encode("utf-8")))

    return {"on_prompt": on_prompt}


def _add_tag_command(commands) -> None:
    tag = commands.add_parser("tag", help="print the tags the RAM / DAPE tagger reads from images")
    tag.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="image files or folders")
    tag.add_argument("--tagger", choices=["dape", "ram"], default="dape", help="dape (OSEDiff's, default) or ram")
    tag.add_argument("--ram-weights", type=Path, help="ram_swin_large_14m.pth (default: the cached registry copy)")
    tag.add_argument("--dape-weights", type=Path, help="DAPE.pth (default: the cached registry copy)")
    tag.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    tag.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def run_tag(args) -> int:
    """One line per image: 'IMAGE: tags'. An image that fails is one error line; the others go on."""
    from diffsr import taggers
    from diffsr.images import MAX_INPUT_PIXELS, as_picture

    try:
        paths = collect_inputs(args.inputs)
        if not paths:
            raise UsageError(f"no images found in {', '.join(map(str, args.inputs))}")
        tagger = taggers.load(args.tagger, device=args.device, dtype=args.dtype, ram_weights=args.ram_weights,
                              dape_weights=args.dape_weights)
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    failures = 0
    for path in paths:
        try:
            print(f"{path}: {tagger(as_picture(path, MAX_INPUT_PIXELS).to_tensor())[0]}")
        except DiffsrError as error:
            _fail(str(error))
            failures += 1
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _pixels(megapixels: float, option: str) -> int:
    if not megapixels > 0:
        raise UsageError(f"{option} must be positive, got {megapixels:g}")
    return round(megapixels * 1e6)


def run_demo(args) -> int:
    from diffsr.demo import run_demo as demo

    return demo(args.output, args.models, quiet=args.quiet)


def run_degrade(args) -> int:
    from diffsr.degradation.testset import make_test_set

    try:
        report = make_test_set(args.hr_dir, args.output, crop=args.crop, count=args.count, seed=args.seed,
                               config=args.config, scale=args.scale, device=args.device,
                               batch_size=args.batch_size, quiet=args.quiet)
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    if not args.quiet:
        print(f"wrote {report.written} pair(s) to {args.output}, {report.already_there} already there"
              + (f"; {len(report.failed)} failed" if report.failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


def _metric_kwargs(args) -> dict:
    return dict(backend=args.metric_backend, weights_dir=args.metric_weights, download=not args.offline,
                crop_border=args.crop_border)


def run_evaluate(args) -> int:
    from tempfile import TemporaryDirectory

    from tqdm import tqdm

    from diffsr.images import check_output_folder, write_atomically
    from diffsr.metrics.evaluate import evaluate, evaluate_runs, render

    def progress(items):
        return tqdm(items, desc="evaluating", unit="image", disable=args.quiet, file=sys.stderr, leave=False)

    device = args.metric_device or args.device
    try:
        if args.output:  # found before any computing
            if args.output.is_dir():
                raise UsageError(f"{args.output}: is a folder; -o names the table's file")
            check_output_folder(args.output.parent)
        if args.runs or args.seeds:
            if args.lr is None or args.sr:
                raise UsageError("--runs/--seeds upscale the --lr folder: give --lr and no SR_DIR")
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.runs))
            with TemporaryDirectory() as scratch:
                from diffsr.report.benchmark import run_method

                work = args.work_dir or Path(scratch)
                failures: list[str] = []
                method = run_method(args.method, collect_inputs([args.lr]), work, args.scale, seeds, args.device,
                                    args.dtype, args.base, args.weights, _load_options(args), failures)
                for failure in failures:
                    _fail(failure)
                result = evaluate_runs(method.folders, args.gt, args.metrics, device=device, progress=progress,
                                       **_metric_kwargs(args))
        elif len(args.sr) > 1:
            result = evaluate_runs(args.sr, args.gt, args.metrics, device=device, progress=progress, **_metric_kwargs(args))
        elif len(args.sr) == 1:
            result = evaluate(args.sr[0], args.gt, args.metrics, device=device, progress=progress, **_metric_kwargs(args))
        else:
            raise UsageError("give a result folder (SR_DIR), or --lr with --runs")
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    text = render(result, args.format)
    if args.output:
        try:
            write_atomically(args.output, lambda file: file.write(text.encode()))
        except DiffsrError as error:
            _fail(str(error))
            return EXIT_SOME_FAILED
    else:
        print(text, end="")
    data = result.to_dict()
    for metric, why in data["unavailable"].items():
        _fail(f"{metric} not computed: {why}")
    return EXIT_SOME_FAILED if data["unavailable"] or data["problems"] else EXIT_OK


def run_benchmark(args) -> int:
    from diffsr.report.benchmark import run_benchmark as benchmark, write_outputs

    def log(message):
        if not args.quiet:
            print(message, file=sys.stderr)

    try:
        result = benchmark(args.methods.split(","), args.lr, args.gt, args.output, args.metrics, scale=args.scale,
                           seed=args.seed, runs=args.runs, device=args.device, dtype=args.dtype, bases=args.base,
                           weights=args.weights, de_nets=args.de_net, results=args.results,
                           metric_device=args.metric_device, metric_backend=args.metric_backend,
                           metric_weights=args.metric_weights, download=not args.offline,
                           crop_border=args.crop_border, dataset=args.dataset, log=log)
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    paths = write_outputs(result, args.title)
    print(paths["md"].read_text(), end="")
    log(f"report: {paths['html']}")
    failed = [m for m in result.methods if m.error] or result.unavailable
    return EXIT_SOME_FAILED if failed else EXIT_OK


def run_convert(args) -> int:
    from diffsr.methods import get_method
    from diffsr.weights import resolve

    try:
        method = get_method(args.method)
        args.output.mkdir(parents=True, exist_ok=True)
        for path in args.inputs:
            target = args.output / (path.stem + ".safetensors")
            method.convert_weights(path, resolve(args.base or method.default_base, "base", method.name), target)
            print(f"wrote {target}", file=sys.stderr)
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    return EXIT_OK


def run_train(args) -> int:
    import yaml

    from diffsr.training.config import load_config
    from diffsr.training.loop import train

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--set {item}: expected KEY=VALUE, e.g. train.steps=100")
            return EXIT_USAGE
        overrides[key] = yaml.safe_load(value)
    try:
        train(load_config(args.config, overrides), resume=not args.no_resume, progress=not args.quiet)
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "upscale":
        return run_upscale(args)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "degrade":
        return run_degrade(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    if args.command == "benchmark":
        return run_benchmark(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "weights":
        return run_weights(args)
    if args.command == "tag":
        return run_tag(args)
    if args.command == "methods":
        from diffsr.methods import list_methods

        print("\n".join(list_methods()))
        return EXIT_OK
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
