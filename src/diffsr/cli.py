"""The `diffsr` command line: argument parsing that calls into the library.

Exit codes: 0 success, 1 some inputs failed (the others were written), 2 bad usage or nothing could run.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from diffsr.backbone import COMPILE_MODES, DTYPE_CHOICES
from diffsr.color import COLOR_FIXES
from diffsr.errors import DiffsrError, UsageError
from diffsr.images import MAX_INPUT_PIXELS, MAX_OUTPUT_PIXELS, OUTPUT_FORMATS, collect_inputs

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
DTYPE_HELP = ("auto (default): float16 on CUDA, as the releases run there, with a float16 VAE pass that overflows "
              "redone in float32; float32 elsewhere (the fastest measured on the CPU)")


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
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--winograd", action=argparse.BooleanOptionalAction,
                        help="CPU float32: 3x3 convolutions by NNPACK's Winograd transform (on by default: about "
                             "1.6-2.1x faster per image, same output within float32 rounding); --no-winograd: direct "
                             "convolution")
    parser.add_argument("--compile", choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile the UNet and the VAE in this mode (" + ", ".join(COMPILE_MODES) + "; "
                             "reduce-overhead adds CUDA graphs on a GPU); the first image of each size pays the "
                             "compilation, so it pays off on folders of same-size images. Off by default")
    parser.add_argument("--merge-lora", action=argparse.BooleanOptionalAction,
                        help="osediff: fold LoRA into the base weights (on by default: faster, same output within "
                             "float error); --no-merge-lora keeps the adapters apart")
    _add_tagger_options(parser)
    parser.add_argument("--process-size", type=_process_size, metavar="PX",
                        help="osediff, ccsr, stablesr: the size small inputs are enlarged to before upscaling (the "
                             "release's --process_size / --input_size; default the method's: 512, 768 for 768-v)")
    parser.add_argument("--sample-posterior", action="store_true",
                        help="sample the VAE posterior with --seed as the release does (default: its mean)")
    parser.add_argument("--de-net", help="s3diff: degradation estimator weights, a file or registry name "
                                         "(default: s3diff-de-net, or de_net.pth beside a --weights file)")
    parser.add_argument("--cfw-weights", help="StableSR: the CFW autoencoder, a file or registry name (default: "
                                              "stablesr-cfw, or vqgan_cfw_00011.ckpt beside a --weights file)")


def _process_size(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 8")
    return value


def _score(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def _method_knobs(args) -> dict:
    """The method knobs given on the command line (the others keep the method's defaults; a method
    rejects knobs it does not have)."""
    knobs = {name: getattr(args, name) for name in _knob_flags() if getattr(args, name, None) is not None}
    if args.degradation_blur is not None or args.degradation_noise is not None:
        knobs["degradation"] = (args.degradation_blur, args.degradation_noise)
    return knobs


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--scale", type=float, default=4, help="upscaling factor, 1 to 8 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every random draw (default 0)")
    parser.add_argument("--color-fix", choices=COLOR_FIXES, help="colour correction (default: the method's release default)")
    parser.add_argument("--format", choices=sorted(OUTPUT_FORMATS), help="output type (default: the input's own)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: skip them); an input file is never replaced")
    parser.add_argument("--max-input-megapixels", type=float, default=MAX_INPUT_PIXELS / 1e6, metavar="MP",
                        help="refuse larger inputs, from their header before decoding (default %(default)g)")
    parser.add_argument("--max-output-megapixels", type=float, default=MAX_OUTPUT_PIXELS / 1e6, metavar="MP",
                        help="refuse inputs whose output would be larger (default %(default)g)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_knob_options(parser)


def _add_knob_options(parser: argparse.ArgumentParser) -> None:
    """The method knobs (upscale and benchmark), made from each method's Knobs fields (diffsr.knobs) and grouped
    per method, a flag several methods take once in its own group; then the tiling options. _method_knobs and
    _tiling_knobs collect them."""
    from diffsr.methods import METHODS

    shared = parser.add_argument_group("shared by several methods")
    groups = {name: parser.add_argument_group(f"{name} options") for name in METHODS}
    for name, fields in _knob_flags().items():
        group = shared if len(fields) > 1 else groups[next(iter(fields))]
        group.add_argument(_flag(name), dest=name, **_flag_spec(name, fields))
    for method in METHODS.values():  # a knob of two values, given by two flags
        if "degradation" in _knob_names(method):
            group = groups[method.name]
            group.add_argument("--degradation-blur", type=_score, metavar="SCORE",
                               help="use this blur score in [0, 1] instead of the estimate")
            group.add_argument("--degradation-noise", type=_score, metavar="SCORE",
                               help="use this noise score in [0, 1] instead of the estimate")
    tiles = parser.add_argument_group("tiling (large images; sizes in latent pixels = 8 image pixels)")
    tiles.add_argument("--tile-size", type=int, help="denoiser tile (default: the method's, shrunk to fit --max-memory)")
    tiles.add_argument("--tile-overlap", type=int, help="overlap of denoiser tiles (default 32)")
    tiles.add_argument("--vae-tile-size", type=int,
                       help="VAE encoder/decoder tile; larger latents run in bands of this many rows "
                            "(default 128/224, shrunk to fit)")
    tiles.add_argument("--tile-batch", type=int, help="denoiser tiles per network call (default 1)")
    tiles.add_argument("--max-memory", type=float, help="working-memory budget in GB (default: from the device)")
    tiles.add_argument("--release-gaussian", action="store_true",
                       help="the released code's off-centre tile weights (for parity)")


def _knob_names(method) -> tuple[str, ...]:
    return method.Knobs.names() if method.Knobs is not None else method.knob_names()


def _knob_fields(method) -> dict:
    """A method's knobs: name -> its Knobs field, or None while the method's Knobs is not declared (the names
    from knob_names(); the flags from _UNDECLARED)."""
    import dataclasses

    if method.Knobs is None:
        return dict.fromkeys(method.knob_names())
    return {field.name: field for field in dataclasses.fields(method.Knobs)}


def _knob_flags() -> dict[str, dict]:
    """The knobs that are one flag each: name -> {method: _knob_fields' field}. Left out: knobs of another shape
    (degradation: two flags; on_prompt: --show-prompt, --save-prompts) and those that are also load options,
    whose flag is the load option's (--sample-posterior)."""
    from diffsr.methods import METHODS

    load_options = {option for method in METHODS.values() for option in method.load_option_names()}
    flags: dict[str, dict] = {}
    for method in METHODS.values():
        for name, field in _knob_fields(method).items():
            one_value = field.metadata.get("kind") in (bool, int, float, str) if field else name in _UNDECLARED
            if one_value and name not in load_options:
                flags.setdefault(name, {})[method.name] = field
    return flags


def _flag_spec(name: str, fields: dict) -> dict:
    """argparse's keywords for the flag of knob `name`, taken by the methods of `fields` (method -> field): type
    and choices from the first declared field; help and default from each (one text where they agree)."""
    declared = {method: field for method, field in fields.items() if field is not None}
    if not declared:
        return dict(_UNDECLARED[name])
    rules = next(iter(declared.values())).metadata
    if rules["kind"] is bool:
        spec = dict(action="store_true", default=None)
    elif rules.get("choices"):
        spec = dict(type=rules["kind"], choices=rules["choices"], default=None)
    else:
        spec = dict(type=rules["kind"], default=None, metavar=name.split("_")[-1].upper())
    texts = {method: _described(field.metadata) for method, field in declared.items()}
    defaults = {method: _shown(field.default) for method, field in declared.items()}
    undeclared = [method for method in fields if method not in declared]
    if len(fields) == 1:
        method = next(iter(declared))
        text = texts[method] + (f" (default {defaults[method]})" if defaults[method] else "")
    elif len(set(texts.values())) == 1:  # one meaning: the defaults listed per method
        text = f"{next(iter(texts.values()))} (default " + ", ".join(
            [f"{method} {default or 'varies'}" for method, default in defaults.items()]
            + [f"{method}'s own" for method in undeclared]) + ")"
    else:
        text = "; ".join([f"{method}: {texts[method]}" + (f" (default {defaults[method]})" if defaults[method] else "")
                          for method in declared] + [f"{method}: its own default" for method in undeclared])
    # knob names in the help written as flags (only names of several words: "steps" is also a word)
    spec["help"] = _with_flags(text, [knob for knob in _knob_flags() if "_" in knob]).replace("%", "%%")
    return spec


def _described(rules: dict) -> str:
    """A knob's help with its range."""
    low, high = rules.get("low"), rules.get("high")
    bounds = [part for part in (None if low is None else f"{'above' if rules.get('low_open') else 'at least'} {low}",
                                None if high is None else f"at most {high}") if part]
    return rules["help"] + ("; " + " and ".join(bounds) if bounds else "")


def _shown(value) -> str:
    """A default as the help shows it: text quoted, cut short; '' for None (decided by the variant or by other
    knobs, which the knob's help says)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 30 else value[:27] + "...")
    return "" if value is None else str(value)


# The flags of knobs of methods whose Knobs is not declared yet (known by knob_names()), as written by hand
# before the Knobs dataclasses; each method's declared Knobs takes its part over.
_UNDECLARED = {
    "prompt": dict(help="text prompt (default: the method's; empty for osediff)"),
    "negative_prompt": dict(help="negative prompt for classifier-free guidance (default: the method's)"),
    "guidance_scale": dict(type=float, help="classifier-free guidance scale (default: the method's; s3diff 1.07, "
                                            "stablesr 1; 1 = off)"),
    "t_max": dict(type=float, help="CCSR: where the truncated chain starts, in [0, 1]"),
    "t_min": dict(type=float, help="CCSR: where the truncated chain stops, in [0, 1), below --t-max"),
    "show_degradation": dict(action="store_true", default=None, help="s3diff: print each image's degradation scores"),
    "steps": dict(type=int, help="sampling steps (default: the method's; stablesr 200, 4 for turbo)"),
    "sampler": dict(choices=["ddpm", "ddim"], help="StableSR sampler (default ddpm)"),
    "eta": dict(type=float, help="DDIM noise (default 0: deterministic)"),
    "fidelity": dict(type=float, help="StableSR CFW weight w in [0, 1] (default 0.5)"),
}


# The flag of a method knob or load option where it is not --name-with-dashes.
_FLAG_OF = {"degradation": "--degradation-blur/--degradation-noise", "on_prompt": "--show-prompt/--save-prompts"}


def _flag(name: str) -> str:
    return _FLAG_OF.get(name, "--" + name.replace("_", "-"))


def _with_flags(message: str, names) -> str:
    """A library message with the Python names among `names` written as the flags the user typed
    (max_memory -> --max-memory)."""
    for name in names:
        message = re.sub(rf"(?<![-\w]){name}\b", _flag(name), message)
    return message


def _check_flags(args, method) -> None:
    """What needs no model, before it loads: the scale, the device, flags of other methods, the tile sizes.
    A UsageError names the flags as typed."""
    from diffsr.backbone import resolve_device
    from diffsr.methods import METHODS
    from diffsr.methods.base import check_scale
    from diffsr.tiling import TILING_KNOBS, TilingOptions

    try:
        check_scale(args.scale)
        resolve_device(args.device)
    except UsageError as error:
        raise UsageError(_with_flags(str(error), ("scale", "device"))) from None
    takes = set(_knob_names(method)) | set(method.load_option_names()) | set(SHARED_LOAD_OPTIONS)
    # --show-prompt / --save-prompts report through the on_prompt knob: only methods with prompts from a tagger take it
    reports = ["on_prompt"] if args.show_prompt or args.save_prompts else []
    foreign = [name for name in (*_method_knobs(args), *_load_options(args), *reports) if name not in takes]
    if foreign:
        owners = {name: [m.name for m in METHODS.values() if name in (*_knob_names(m), *m.load_option_names())]
                  for name in foreign}
        raise UsageError(f"--method {method.name} does not take " + "; ".join(
            f"{_flag(name)} ({'a flag of ' + ', '.join(sorted(owners[name])) if owners[name] else 'no method takes it'})"
            for name in foreign))
    _check_knob_values(method, _method_knobs(args))
    try:
        TilingOptions.from_knobs(_tiling_knobs(args))
    except UsageError as error:
        raise UsageError(_with_flags(str(error), TILING_KNOBS)) from None


def _check_knob_values(method, knobs: dict) -> None:
    """Each knob value `method` takes checked against its Knobs field (type, range, choices), before loading.
    Rules across knobs wait for the model: a variant's defaults (stablesr-turbo's steps, CCSR's t_max) may be
    known only from its weights."""
    from diffsr.knobs import check_value

    fields, flags = _knob_fields(method), _knob_flags()
    for name, value in knobs.items():
        if fields.get(name) is not None and name in flags:
            try:
                check_value(name, value, fields[name].metadata)
            except UsageError as error:
                raise UsageError(_with_flags(str(error), (name,))) from None


def _tiling_knobs(args) -> dict:
    from diffsr.tiling import TILING_KNOBS

    # `is`, not `in (None, False)`: 0 == False, and --max-memory 0 must reach the check, not vanish
    return {name: getattr(args, name) for name in TILING_KNOBS if getattr(args, name) is not None
            and getattr(args, name) is not False}


def build_parser() -> argparse.ArgumentParser:
    from diffsr import __version__

    parser = argparse.ArgumentParser(prog="diffsr", description="Real-world image super-resolution with diffusion priors.")
    parser.add_argument("--version", action="version", version=f"diffsr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    upscale = commands.add_parser("upscale", help="upscale images or folders of images")
    upscale.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="image files or folders")
    _add_model_options(upscale)
    _add_run_options(upscale)
    _add_prompt_report_options(upscale)

    upscale.add_argument("--offline", action="store_true",
                         help="use only cached weights, never download (as HF_HUB_OFFLINE=1 does)")
    _add_shard_option(upscale, "sorted inputs, split by pixel count")
    _add_weights_command(commands)
    _add_ui_command(commands)
    _add_tag_command(commands)

    demo = commands.add_parser("demo", help="run the whole pipeline on the bundled example image")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    demo.add_argument("--models", type=Path, default=None,
                      help="where the tiny test model is written (default: ~/.cache/diffsr/tiny)")
    demo.add_argument("--quiet", action="store_true")

    commands.add_parser("methods", help="list the methods: their variants, default weights and base, and flags")

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
    _add_shard_option(degrade, "pairs")
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


def _shard(text: str) -> tuple[int, int]:
    from diffsr.distributed import parse_shard

    try:
        return parse_shard(text)
    except DiffsrError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_shard_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--shard", type=_shard, metavar="I/N",
                        help=f"do only part I of N (1-based) of the {what}, e.g. --shard "
                             "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; under torchrun the processes split that part")


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
    benchmark.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    benchmark.add_argument("--scale", type=float, default=4)
    benchmark.add_argument("--seed", type=int, default=0)
    benchmark.add_argument("--runs", type=int, default=1, help="runs per method with seeds seed..seed+N-1 (adds G-STD, L-STD)")
    benchmark.add_argument("--dataset", help="dataset name for the papers' reference rows (e.g. DIV2K-Val, RealSR)")
    benchmark.add_argument("--title", default="diffsr benchmark")
    benchmark.add_argument("--show", metavar="NAMES|N|all",
                           help="which LR images get side-by-side panels: comma-separated names, the first N, or all "
                                "(default: the first 8)")
    benchmark.add_argument("--crop", action="append", default=[], metavar="X,Y,SIZE",
                           help="a 1:1 crop shown from every panel, in ground-truth pixels; repeatable (default: the "
                                "two most detailed regions of each image)")
    benchmark.add_argument("--quiet", action="store_true")
    _add_knob_options(benchmark)  # each method gets the knobs it takes


SHARED_LOAD_OPTIONS = ("winograd", "compile")  # load_upscaler's own options, for every method


def _load_options(args) -> dict:
    """The model-loading options given on the command line (_add_model_options), for load_upscaler."""
    given = {"merge_lora": args.merge_lora, "sample_posterior": args.sample_posterior, "tagger": args.tagger,
             "tagger_device": args.tagger_device, "ram_weights": args.ram_weights, "dape_weights": args.dape_weights,
             "de_net": args.de_net, "cfw_weights": args.cfw_weights, "process_size": args.process_size,
             "winograd": args.winograd, "compile": args.compile}
    # --no-merge-lora and --no-winograd are an explicit False; the other flags are left out unless set
    return {name: value for name, value in given.items()
            if value or (name in ("merge_lora", "winograd") and value is not None)}


def run_upscale(args) -> int:
    from diffsr.distributed import Processes

    processes = Processes.launched(args.shard)  # one process unless started by torchrun / accelerate launch
    try:
        return _upscale(args, processes)
    finally:
        processes.close()


def _upscale(args, processes) -> int:
    from diffsr.batch import Tally, plan_share, summarize
    from diffsr.images import check_output_folder
    from diffsr.methods import get_method

    # Every process finds the same usage errors: the main process says them.
    fail = _fail if processes.is_main else (lambda message: None)
    # Whatever would fail every image is found before the model is loaded.
    try:
        method = get_method(args.method)
        _check_flags(args, method)
        if processes.is_main:
            _warn_if_slow_dtype(args.device, args.dtype)
        limits = {"max_input_pixels": _pixels(args.max_input_megapixels, "--max-input-megapixels"),
                  "max_output_pixels": _pixels(args.max_output_megapixels, "--max-output-megapixels")}
        paths = collect_inputs(args.inputs)
        if not paths:
            raise UsageError(f"no images found in {', '.join(map(str, args.inputs))}")
        check_output_folder(args.output)
    except DiffsrError as error:
        fail(str(error))
        return EXIT_USAGE

    plan = plan_share(paths, args.output, args.format, args.overwrite, processes)
    for line in plan.refused:
        _fail(line)
    if plan.skipped:
        print(f"skipping {plan.skipped} input(s) whose output already exists (use --overwrite to replace)",
              file=sys.stderr)
    tally = Tally(skipped=plan.skipped, failed=len(plan.refused))
    if plan.jobs:
        report = _upscale_jobs(args, method, limits, plan, processes)
        if report is None:
            return EXIT_USAGE
        tally = report.tally()
    tallies = processes.gather(tally)  # every process waits here for the others: one summary, one exit code
    failed = any(t.failed for t in tallies)
    if processes.is_main and not args.quiet:
        if processes.parallel or args.shard:
            print("\n".join(summarize(tallies)), file=sys.stderr)
        elif tally.written or failed:
            print(f"wrote {tally.written} image(s) to {args.output}" + (f"; {tally.failed} failed" if failed else ""),
                  file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _upscale_jobs(args, method, limits, plan, processes):
    """Load the model once (on this process's device) and upscale this process's jobs (diffsr.batch): the
    batch's report, or None when the model cannot run (said by this process; torchrun then stops the others)."""
    import diffsr
    from diffsr.batch import upscale_all
    from diffsr.display import Display

    show = not args.quiet and processes.is_main
    # Only the knobs the user gave: the others keep each method's release defaults.
    knobs = {**_method_knobs(args), **_tiling_knobs(args)}
    try:
        upscaler = diffsr.load_upscaler(method.name, base=args.base, weights=args.weights,
                                        device=processes.device(args.device), dtype=args.dtype,
                                        offline=args.offline or None, progress=show, **_load_options(args))
        upscaler.check_arguments(args.scale, args.seed, args.color_fix, knobs)
    except (DiffsrError, TypeError) as error:
        from diffsr.tiling import TILING_KNOBS

        # every knob's name, not only those given: "--t-min (0.9) must be smaller than --t-max"
        message = _with_flags(str(error), (*_knob_names(method), *TILING_KNOBS))
        if processes.parallel:
            processes.say(f"diffsr: error: {message}")
        else:
            _fail(message)
        return None

    display = Display(quiet=not show)
    rank = f"[rank {processes.rank}] " if processes.parallel else ""

    def upscale(path, callback):
        return upscaler.upscale(path, scale=args.scale, seed=args.seed, color_fix=args.color_fix, **limits,
                                callback=callback, **knobs,
                                **_prompt_report_knobs(args, path, lambda line: display.write(line, sys.stdout)))

    return upscale_all(plan, upscale, lambda kind, line: display.write(f"{rank}diffsr: {kind}: {line}"), display,
                       title=f"{method.name} x{args.scale:g}")


def run_methods() -> int:
    """Each method with its released variants (from the weights registry), the default, and its own flags."""
    from diffsr import weights
    from diffsr.methods import METHODS, list_methods

    upscale_flags = _subparser(build_parser(), "upscale")._option_string_actions
    registry = weights.Registry.load()
    for name in list_methods():
        method = METHODS[name]
        released = [item for item in registry.items.values() if item.kind == "weights" and item.method == name]
        default = next((item for item in released if item.default), None)
        print(f"{name}: default weights {default.name if default else '(none: give --weights)'} on base "
              f"{default.base if default and default.base else method.default_base}")
        width = max((len(item.name) for item in released), default=0) + 4  # room for " *"
        for item in released:
            print(f"  {(item.name + (' *' if item.default else '')).ljust(width)}{item.variant or '':28}"
                  f"base {item.base or method.default_base}")
        flags = [_flag(n) for n in dict.fromkeys((*_knob_names(method), *method.load_option_names()))
                 if _flag(n).split("/")[0] in upscale_flags]
        print(f"  flags: {', '.join(flags)}")
    print("* the default; `diffsr weights list` shows sizes and what is cached", file=sys.stderr)
    return EXIT_OK


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[command]


def _warn_if_slow_dtype(device: str, dtype: str) -> None:
    """float16 on a CPU runs in emulation (far slower than float32, whose convolutions run by Winograd there)."""
    import torch

    if dtype in ("float16", "fp16") and torch.device(device).type == "cpu":
        print("diffsr: warning: --dtype float16 on the CPU is very slow (emulated); float32, the default on the CPU "
              "(auto), is the fastest CPU mode measured (benchmarks/results/speed_vs_release.md)", file=sys.stderr)


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
    tag.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


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
    """An upscale of the bundled example with the tiny random model (written once under --models)."""
    from diffsr.demo import BANNER, EXAMPLE, default_models, ensure_tiny_models, example_path

    print(BANNER, file=sys.stderr)
    base, weights = ensure_tiny_models(args.models or default_models())
    code = main(["upscale", str(example_path()), "-o", str(args.output), "--method", "osediff", "--base", str(base),
                 "--weights", str(weights), "--scale", "4", "--overwrite"] + (["--quiet"] if args.quiet else []))
    if code == 0:
        print(f"smoke test passed: {args.output / EXAMPLE} (random-model output, not an upscale)", file=sys.stderr)
    return code


def run_degrade(args) -> int:
    from diffsr.batch import summarize
    from diffsr.degradation.testset import make_test_set
    from diffsr.distributed import Processes

    processes = Processes.launched(args.shard)
    try:
        report = make_test_set(args.hr_dir, args.output, crop=args.crop, count=args.count, seed=args.seed,
                               config=args.config, scale=args.scale, device=processes.device(args.device),
                               batch_size=args.batch_size, quiet=args.quiet, processes=processes)
    except DiffsrError as error:
        if processes.is_main:  # every process finds it
            _fail(str(error))
        return EXIT_USAGE
    finally:
        processes.close()
    if not args.quiet and processes.is_main:
        if processes.parallel or args.shard:
            print("\n".join(summarize(report.tallies, "pairs")), file=sys.stderr)
        else:
            print(f"wrote {report.written} pair(s) to {args.output}, {report.already_there} already there"
                  + (f"; {len(report.failed)} failed" if report.failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


def _metric_kwargs(args) -> dict:
    return dict(backend=args.metric_backend, weights_dir=args.metric_weights, download=not args.offline,
                crop_border=args.crop_border)


def run_evaluate(args) -> int:
    from diffsr.distributed import Processes

    processes = Processes.launched()  # one process unless started by torchrun / accelerate launch
    try:
        return _evaluate(args, processes)
    finally:
        processes.close()


def _evaluate(args, processes) -> int:
    from tempfile import TemporaryDirectory

    from tqdm import tqdm

    from diffsr.display import Display
    from diffsr.images import check_output_folder, write_atomically
    from diffsr.metrics.evaluate import evaluate, evaluate_runs, render

    # Every process gets the same result (the scores are gathered): the main process says and writes it.
    fail = _fail if processes.is_main else (lambda message: None)

    def progress(items):
        # a bar on a terminal only: in a log its carriage returns would be noise
        return tqdm(items, desc="evaluating", unit="image", file=sys.stderr, leave=False,
                    disable=args.quiet or not processes.is_main or not sys.stderr.isatty())

    device = processes.device(args.metric_device or args.device)
    metric_kwargs = {**_metric_kwargs(args), "processes": processes}
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

                if processes.parallel and args.work_dir is None:
                    raise UsageError("--runs in a launched job: give --work-dir, a folder every process sees")
                work = args.work_dir or Path(scratch)
                failures: list[str] = []
                method = run_method(args.method, collect_inputs([args.lr]), work, args.scale, seeds, args.device,
                                    args.dtype, args.base, args.weights, _load_options(args), failures,
                                    processes=processes, display=Display(quiet=args.quiet or not processes.is_main))
                for failure in failures:
                    fail(failure)
                result = evaluate_runs(method.folders, args.gt, args.metrics, device=device, progress=progress,
                                       **metric_kwargs)
        elif len(args.sr) > 1:
            result = evaluate_runs(args.sr, args.gt, args.metrics, device=device, progress=progress, **metric_kwargs)
        elif len(args.sr) == 1:
            result = evaluate(args.sr[0], args.gt, args.metrics, device=device, progress=progress, **metric_kwargs)
        else:
            raise UsageError("give a result folder (SR_DIR), or --lr with --runs")
    except DiffsrError as error:
        fail(str(error))
        return EXIT_USAGE
    data = result.to_dict()
    code = EXIT_SOME_FAILED if data["unavailable"] or data["problems"] else EXIT_OK
    if not processes.is_main:
        return code
    text = render(result, args.format)
    if args.output:
        try:
            write_atomically(args.output, lambda file: file.write(text.encode()))
        except DiffsrError as error:
            _fail(str(error))
            return EXIT_SOME_FAILED
    else:
        print(text, end="")
    for metric, why in data["unavailable"].items():
        _fail(f"{metric} not computed: {why}")
    return code


def run_benchmark(args) -> int:
    from diffsr.display import Display
    from diffsr.distributed import Processes
    from diffsr.methods import METHODS
    from diffsr.report.benchmark import run_benchmark as benchmark, write_outputs
    from diffsr.report.html import chosen_images, parse_crop, parse_show

    processes = Processes.launched()  # one process unless started by torchrun / accelerate launch
    display = Display(quiet=args.quiet or not processes.is_main)

    def log(message):
        if not args.quiet and processes.is_main:
            display.write(message)

    knobs = {**_method_knobs(args), **_tiling_knobs(args)}
    if processes.is_main:
        _warn_if_slow_dtype(args.device, args.dtype)
    try:
        for name in args.methods.split(","):  # knob values each method takes, before any model loads
            if name.strip().lower() in METHODS:
                _check_knob_values(METHODS[name.strip().lower()], knobs)
        show, crops = parse_show(args.show), [parse_crop(text) for text in args.crop]
        if args.lr.is_dir():
            chosen_images(collect_inputs([args.lr]), show)  # an unknown name is said before any work
        result = benchmark(args.methods.split(","), args.lr, args.gt, args.output, args.metrics, scale=args.scale,
                           seed=args.seed, runs=args.runs, device=args.device, dtype=args.dtype, bases=args.base,
                           weights=args.weights, de_nets=args.de_net, results=args.results,
                           metric_device=args.metric_device, metric_backend=args.metric_backend,
                           metric_weights=args.metric_weights, download=not args.offline,
                           crop_border=args.crop_border, dataset=args.dataset, knobs=knobs, log=log,
                           processes=processes, display=display)
    except DiffsrError as error:
        if processes.is_main:  # every process finds it
            _fail(_with_flags(str(error), knobs))
        return EXIT_USAGE
    finally:
        processes.close()
    failed = [m for m in result.methods if m.error] or result.unavailable
    if processes.is_main:
        paths = write_outputs(result, args.title, show=show, crops=crops)
        print(paths["md"].read_text(), end="")
        log(f"report: {paths['html']}")
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


def _add_ui_command(commands) -> None:
    ui = commands.add_parser("ui", help='a local web app (needs pip install "diffsr[ui]")')
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    ui.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    ui.add_argument("--share", action="store_true", help="also serve through a public gradio.live link (off by default)")
    ui.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this user and password (use it beyond localhost)")
    ui.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu); requests queue on it")
    ui.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    ui.add_argument("--base", action="append", default=[], metavar="[METHOD=]DIR",
                    help="Stable Diffusion base for local --weights (all methods, or per method)")
    ui.add_argument("--weights", action="append", default=[], metavar="METHOD=FILE",
                    help="local weights offered first for METHOD (besides the registry's variants); repeatable")
    ui.add_argument("--offline", action="store_true", help="use only cached weights, never download")
    ui.add_argument("--keep-models", type=int, default=2, metavar="N",
                    help="loaded models kept in memory between requests (default 2)")
    ui.add_argument("-o", "--output", type=Path, help="where results are written (default: a temporary folder)")


def run_ui(args) -> int:
    from diffsr.ui import INSTALL_HINT, gradio_available

    if not gradio_available():
        _fail(INSTALL_HINT)
        return EXIT_USAGE
    from diffsr.report.benchmark import parse_assignments

    try:
        bases, default_base = parse_assignments(args.base, "--base")
        local, bare = parse_assignments(args.weights, "--weights")
        if bare is not None:
            raise UsageError(f"--weights {bare}: say which method it is for (METHOD=FILE)")
        auth = None
        if args.auth is not None:
            user, sep, password = args.auth.partition(":")
            if not sep or not user or not password:
                raise UsageError("--auth must be USER:PASSWORD")
            auth = (user, password)
    except DiffsrError as error:
        _fail(str(error))
        return EXIT_USAGE
    if auth is None and (args.share or args.host not in ("127.0.0.1", "localhost", "::1")):
        print("diffsr: warning: serving beyond this machine without --auth: anyone who reaches it can run models "
              "and read the results", file=sys.stderr)
    from diffsr.ui.app import launch
    from diffsr.ui.service import ModelCache

    models = ModelCache(args.device, args.dtype, bases, default_base, offline=args.offline or None,
                        keep=args.keep_models)
    launch(models, local, host=args.host, port=args.port, share=args.share, auth=auth, output=args.output)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from diffsr.tiling import return_freed_memory

    args = build_parser().parse_args(argv)
    # A process-wide allocator setting, so the command line's to make (never a library call's): freed feature
    # maps go back to the system on glibc (about 6% CPU time; see its docstring).
    return_freed_memory()
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
    if args.command == "ui":
        return run_ui(args)
    if args.command == "tag":
        return run_tag(args)
    if args.command == "methods":
        return run_methods()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
