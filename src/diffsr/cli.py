"""The `diffsr` command line: argument parsing that calls into the library.

Exit codes: 0 success, 1 some inputs failed (the others were written), 2 bad usage or nothing could run.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from diffsr.color import COLOR_FIXES
from diffsr.errors import DiffsrError
from diffsr.images import OUTPUT_FORMATS

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _fail(message: str) -> None:
    print(f"diffsr: error: {message}", file=sys.stderr)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from diffsr.methods import list_methods

    parser.add_argument("--method", default="osediff", help=f"one of: {', '.join(list_methods())} (default osediff)")
    parser.add_argument("--base", help="Stable Diffusion base: hub id or local diffusers folder (default: the method's)")
    parser.add_argument("--weights", help="the method's released weights file (e.g. osediff.pkl)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA into the base weights (faster, same output)")
    parser.add_argument("--sample-posterior", action="store_true",
                        help="sample the VAE posterior with --seed as the release does (default: its mean)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--scale", type=float, default=4, help="upscaling factor, 1 to 8 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every random draw (default 0)")
    parser.add_argument("--prompt", default="", help="text prompt (default empty)")
    parser.add_argument("--color-fix", choices=COLOR_FIXES, help="colour correction (default: the method's release default)")
    parser.add_argument("--format", choices=sorted(OUTPUT_FORMATS), help="output type (default: the input's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    tiles = parser.add_argument_group("tiling (large images; sizes in latent pixels = 8 image pixels)")
    tiles.add_argument("--tile-size", type=int, help="denoiser tile (default: the method's, shrunk to fit --max-memory)")
    tiles.add_argument("--tile-overlap", type=int, help="overlap of denoiser tiles (default 32)")
    tiles.add_argument("--vae-tile-size", type=int, help="VAE encoder/decoder tile (default 128/224, shrunk to fit)")
    tiles.add_argument("--tile-batch", type=int, help="denoiser tiles per network call (default 1)")
    tiles.add_argument("--max-memory", type=float, help="working-memory budget in GB (default: from the device)")
    tiles.add_argument("--release-gaussian", action="store_true",
                       help="the released code's off-centre tile weights (for parity)")


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

    demo = commands.add_parser("demo", help="run the whole pipeline on the bundled example image")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    demo.add_argument("--models", type=Path, default=None,
                      help="where the tiny test model is written (default: ~/.cache/diffsr/tiny)")
    demo.add_argument("--quiet", action="store_true")

    commands.add_parser("methods", help="list the available methods")
    return parser


def _output_path(path: Path, output: Path, fmt: str | None) -> Path:
    suffix = OUTPUT_FORMATS[fmt] if fmt else (path.suffix.lower() if path.suffix.lower() in OUTPUT_FORMATS.values() else ".png")
    return output / (path.stem + suffix)


def run_upscale(args) -> int:
    import diffsr
    from diffsr.images import collect_inputs, read_image, write_image
    from diffsr.methods import get_method
    from diffsr.tiling import TilingOptions

    try:
        method = get_method(args.method)
        TilingOptions.from_knobs(_tiling_knobs(args))  # bad tile sizes are a usage error, before any loading
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    paths = collect_inputs(args.inputs)
    if not paths:
        _fail(f"no images found in {', '.join(map(str, args.inputs))}")
        return EXIT_USAGE

    # Plan outputs first: never overwrite without --overwrite, never let two inputs share one output.
    planned, failures, skipped = [], 0, 0
    seen: dict[Path, Path] = {}
    for path in paths:
        target = _output_path(path, args.output, args.format)
        if target in seen:
            _fail(f"{path}: its output {target} would overwrite the output of {seen[target]}; rename one input")
            failures += 1
        elif target.exists() and not args.overwrite:
            skipped += 1
        else:
            seen[target] = path
            planned.append((path, target))
    if skipped and not args.quiet:
        print(f"skipping {skipped} input(s) whose output already exists (use --overwrite to replace)", file=sys.stderr)
    if not planned:
        return EXIT_SOME_FAILED if failures else EXIT_OK

    options = {"merge_lora": args.merge_lora}
    if args.sample_posterior:
        options["sample_posterior"] = True
    try:
        upscaler = diffsr.load_upscaler(method.name, base=args.base, weights=args.weights, device=args.device,
                                        dtype=args.dtype, **options)
    except (DiffsrError, TypeError) as error:
        _fail(str(error))
        return EXIT_USAGE

    from tqdm import tqdm

    written = 0
    progress = tqdm(planned, desc=f"{method.name} x{args.scale:g}", unit="image", disable=args.quiet, file=sys.stderr)
    for path, target in progress:
        try:
            picture = read_image(path)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = upscaler.upscale(picture, scale=args.scale, seed=args.seed, color_fix=args.color_fix,
                                          prompt=args.prompt, **_tiling_knobs(args))
                write_image(target, result.rgb, result.alpha)
            written += 1
            for warning in caught:
                progress.write(f"diffsr: warning: {warning.message}", file=sys.stderr)
        except DiffsrError as error:
            progress.write(f"diffsr: error: {error}", file=sys.stderr)
            failures += 1
        except (RuntimeError, MemoryError) as error:  # e.g. out of memory on the device: keep the batch going
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            progress.write(f"diffsr: error: {path}: {first}", file=sys.stderr)
            failures += 1
    if not args.quiet:
        print(f"wrote {written} image(s) to {args.output}" + (f"; {failures} failed" if failures else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def run_demo(args) -> int:
    from diffsr.demo import run_demo as demo

    return demo(args.output, args.models, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "upscale":
        return run_upscale(args)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "methods":
        from diffsr.methods import list_methods

        print("\n".join(list_methods()))
        return EXIT_OK
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
