"""What the web app does, without gradio: the models it offers, their controls, the loaded-model cache, and
one upscale request (through diffsr.batch, the library's one read -> upscale -> write loop).

Everything here is the library's public surface (load_upscaler, the weights registry, Upscaler.upscale,
its callback= progress); the gradio layer in diffsr.ui.app only lays it out.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffsr
from diffsr.errors import UsageError
from diffsr.images import MAX_INPUT_PIXELS, MAX_OUTPUT_PIXELS, Picture, read_image, to_pil
from diffsr.progress import Step

RELEASE_DEFAULT = "release default"


@dataclass(frozen=True)
class Control:
    """One method knob as the app shows it: the paper's name, the release default and its range."""

    knob: str
    label: str
    default: float | str | None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    info: str = ""

    @property
    def is_text(self) -> bool:
        return isinstance(self.default, str)


# The knobs each method's paper names, with the release defaults (cli.py's flags have the same names).
# ccsr's and stablesr's step defaults depend on the weights: release_defaults() below sets them per variant.
CONTROLS: dict[str, tuple[Control, ...]] = {
    "stablesr": (
        Control("fidelity", "fidelity w (CFW)", 0.5, 0.0, 1.0, 0.01, "0 = realism, 1 = fidelity to the input"),
        Control("steps", "sampling steps", 200, 1, 1000, 1, "release: 200 (StableSR-Turbo: 4)"),
    ),
    "ccsr": (
        Control("steps", "steps", 1, 1, 200, 1, "release: 1 (CCSR-v2), 45 (v1)"),
        Control("t_max", "t_max", 0.6666, 0.0, 1.0, 0.0001, "where the truncated chain starts"),
        Control("t_min", "t_min", 0.0, 0.0, 1.0, 0.0001, "where it stops (below t_max)"),
        Control("guidance_scale", "guidance scale (CFG)", 1.0, 0.1, 15.0, 0.01, "1 = off"),
    ),
    "s3diff": (
        Control("guidance_scale", "guidance scale (CFG)", 1.07, 0.0, 15.0, 0.01, "release: 1.07; 1 = off"),
        Control("degradation_blur", "degradation score: blur", 0.0, 0.0, 1.0, 0.0001,
                "estimated per image unless 'edit the scores' is on"),
        Control("degradation_noise", "degradation score: noise", 0.0, 0.0, 1.0, 0.0001,
                "estimated per image unless 'edit the scores' is on"),
    ),
    "osediff": (
        Control("prompt", "prompt", "", info="your text, after the tags the DAPE tagger reads from the image (as released)"),
    ),
}

TILING_CONTROLS: tuple[Control, ...] = (
    Control("max_memory", "memory budget (GB)", None, 0.1, None, 0.1, "empty: from the device"),
    Control("tile_size", "denoiser tile (latent px)", None, 16, None, 8, "empty: the method's, shrunk to fit"),
    Control("tile_overlap", "tile overlap (latent px)", None, 0, None, 8, "empty: 32"),
    Control("vae_tile_size", "VAE tile (latent px)", None, 16, None, 8, "empty: 128 / 224, shrunk to fit"),
    Control("tile_batch", "tiles per call", None, 1, None, 1, "empty: 1"),
)


def release_defaults(method: str, weights: str) -> dict:
    """The knob values a variant's release uses, where they differ by variant (what the method's load picks
    from the weights: CCSR v1 is the one-file checkpoint, StableSR-Turbo has 'turbo' in its name)."""
    from diffsr.methods.ccsr import V1_DEFAULTS, V2_DEFAULTS

    name = Path(weights).name if weights else ""
    if method == "ccsr":
        chosen = V1_DEFAULTS if name == "ccsr-v1" or name.endswith(".ckpt") else V2_DEFAULTS
        return {k: chosen[k] for k in ("steps", "t_max", "t_min", "guidance_scale")}
    if method == "stablesr":
        return {"steps": 4 if "turbo" in name else 200}
    return {}


# -- the models on offer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One weights variant on offer: a registry name or a local path."""

    value: str
    label: str
    cached: bool


def model_choices(method: str, local: dict[str, str], registry=None) -> list[Choice]:
    """The weights `method` can run with: a local file given to `diffsr ui --weights`, then the registry's
    variants, each with its size and whether it (with its base and extras) is downloaded."""
    from diffsr import weights

    choices = []
    if method in local:
        choices.append(Choice(local[method], f"local: {local[method]}", True))
    registry = registry or weights.Registry.load()
    for item in registry.for_method(method):
        if item.kind != "weights":
            continue
        cached = all(weights.status(registry.get(name)).cached for name in _needed(item))
        size = "size ?" if item.size_text == "?" else item.size_text
        label = (f"{item.name} ({item.variant or 'release'}) · {size} · "
                 + ("downloaded" if cached else "not downloaded"))
        choices.append(Choice(item.name, label, cached))
    return choices


def _needed(item) -> list[str]:
    """A weights item and what it loads with: its base and extras."""
    return [name for name in (item.base, item.name, *item.extras.values()) if name]


def fetch_variant(name: str, registry=None) -> list[Path]:
    """Download (and check) a registry variant with its base and extras; progress goes to tqdm bars, which
    the app follows."""
    from diffsr import weights

    registry = registry or weights.Registry.load()
    return [weights.fetch(needed, registry=registry) for needed in _needed(registry.get(name))]


# -- loaded models ---------------------------------------------------------------------------------------


class ModelCache:
    """Loaded upscalers kept between requests, keyed by (method, weights, device, dtype); the least recently
    used one is dropped beyond `keep`. One lock: a model is loaded once even when requests overlap."""

    def __init__(self, device: str = "cpu", dtype: str = "auto", bases: dict[str, str] | None = None,
                 default_base: str | None = None, offline: bool | None = None, keep: int = 2, load=None):
        self.device, self.dtype, self.offline, self.keep = device, dtype, offline, max(1, keep)
        self.bases, self.default_base = dict(bases or {}), default_base
        self._load = load or diffsr.load_upscaler
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, method: str, weights: str) -> tuple:
        return method, weights, self.device, self.dtype

    def base_for(self, method: str, weights: str) -> str | None:
        """The base given for `method` (or for all) applies to local weights; registry variants know theirs."""
        from diffsr.weights import looks_like_path

        if method in self.bases:
            return self.bases[method]
        return self.default_base if weights and looks_like_path(weights) else None

    def get(self, method: str, weights: str | None):
        key = self.key(method, weights)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            while len(self._models) >= self.keep:  # free the old model before loading the next
                self._models.popitem(last=False)
            model = self._load(method, base=self.base_for(method, weights), weights=weights or None,
                               device=self.device, dtype=self.dtype, offline=self.offline, progress=False)
            self._models[key] = model
            return model

    def loaded(self) -> list[tuple]:
        return list(self._models)


# -- one request ----------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What a result was made with: saved beside it (JSON) so that it can be made again."""

    method: str
    weights: str | None
    scale: float = 4
    seed: int = 0
    color_fix: str | None = None
    knobs: dict = field(default_factory=dict)
    base: str | None = None  # given for local weights; registry variants know their own

    def command(self, input_name: str) -> str:
        """The same run as a `diffsr upscale` command line."""
        words = ["diffsr", "upscale", input_name, "-o", "out", "--method", self.method]
        if self.weights:
            words += ["--weights", self.weights]
        if self.base:
            words += ["--base", self.base]
        words += ["--scale", f"{self.scale:g}", "--seed", str(self.seed)]
        if self.color_fix:
            words += ["--color-fix", self.color_fix]
        for name, value in self.knobs.items():
            if name == "degradation":
                words += ["--degradation-blur", f"{value[0]:.6g}", "--degradation-noise", f"{value[1]:.6g}"]
            elif value is True:
                words.append("--" + name.replace("_", "-"))
            elif value is not None and value is not False:
                words += ["--" + name.replace("_", "-"), str(value)]
        return shlex.join(words)


def method_knobs(method: str, values: dict, edit_degradation: bool = False) -> dict:
    """The knobs of `method` from the app's control values ({knob: value}); s3diff's two scores become its
    `degradation` pair only when the user chose to edit them (else each image's estimate is used)."""
    knobs = {}
    for control in CONTROLS.get(method, ()):
        value = values.get(control.knob)
        if value is None or control.knob.startswith("degradation_"):
            continue
        if control.step == 1 and not control.is_text:
            value = int(value)
        knobs[control.knob] = value
    if method == "s3diff" and edit_degradation:
        knobs["degradation"] = (float(values["degradation_blur"]), float(values["degradation_noise"]))
    return knobs


def tiling_knobs(values: dict) -> dict:
    """The Advanced controls that were filled in (empty: the library's default)."""
    knobs = {}
    for control in TILING_CONTROLS:
        value = values.get(control.knob)
        if value is None or value == "":
            continue
        knobs[control.knob] = float(value) if control.knob == "max_memory" else int(value)
    return knobs


def upload_paths(files: list[str], folder: list[str]) -> list[Path]:
    """The uploaded files, then the images of an uploaded folder (its other files left out, as
    `diffsr upscale FOLDER` does)."""
    from diffsr.images import is_image_name

    return [Path(f) for f in files] + sorted((Path(f) for f in folder if is_image_name(Path(f))), key=lambda p: p.name)


@dataclass
class Result:
    source: Path
    before: Picture  # the input, brought to the output size (nearest: its pixels as they are)
    after: Picture
    settings: Settings
    degradation: tuple[float, float] | None = None
    output: Path | None = None
    settings_file: Path | None = None


@dataclass
class Outcome:
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Tracker:
    """Progress of one request: phases as text, the denoiser's tile batches (diffsr.progress Steps, whose total
    is known from the first) as the fraction, with an ETA. `report(fraction, text)` receives every update
    (gradio's progress bar in the app)."""

    def __init__(self, report: Callable[[float, str], None], images: int):
        self.report, self.images = report, max(1, images)
        self.index, self.within, self.started = 0, 0.0, None

    def phase(self, text: str) -> None:
        self.report(self.fraction(), text)

    def fraction(self) -> float:
        return min(1.0, (self.index + self.within) / self.images)

    def next_image(self) -> None:
        if self.started is None:
            self.started = time.monotonic()
        else:
            self.index += 1
        self.within = 0.0

    def step(self, step: Step) -> None:
        if step.phase != "denoise":
            return
        self.within = step.done / step.total
        done = self.fraction()
        eta = (time.monotonic() - self.started) * (1 - done) / done
        self.report(done, f"image {self.index + 1}/{self.images}: denoise {step.done}/{step.total} · "
                          f"about {eta:.0f} s left")


def upscale_files(models: ModelCache, settings: Settings, paths: list[Path], out_dir: Path, tiling: dict,
                  report: Callable[[float, str], None] = lambda fraction, text: None) -> Outcome:
    """Upscale `paths` with `settings` into `out_dir` (each in its input's format and bit depth, with a
    settings JSON beside it). Bad images are one line each in `errors`; the others are still written."""
    from diffsr.batch import plan_outputs, upscale_all

    outcome = Outcome()
    knobs = dict(settings.knobs)
    report(0.0, f"loading {settings.method}")
    upscaler = models.get(settings.method, settings.weights)
    upscaler.check_arguments(settings.scale, settings.seed, settings.color_fix, {**knobs, **tiling})
    plan = plan_outputs([Path(p) for p in paths], out_dir, overwrite=True)
    tracker = Tracker(report, len(plan.jobs))
    results: dict[Path, Result] = {}

    def upscale(source: Path, callback) -> Picture:  # (no display: the tracker reports to the app)
        tracker.next_image()
        tracker.phase(f"image {tracker.index + 1}/{tracker.images}: reading {source.name}")
        picture = read_image(source, MAX_INPUT_PIXELS)  # the limit checked from the header, before decoding
        used = dict(knobs)
        degradation = None
        if settings.method == "s3diff":  # the scores used are shown and saved (estimated unless given)
            degradation = upscaler.degradation_scores(picture, used.pop("degradation", None))
            used["degradation"] = degradation
        result = upscaler.upscale(picture, scale=settings.scale, seed=settings.seed, color_fix=settings.color_fix,
                                  callback=tracker.step, **used, **tiling)
        tracker.phase(f"image {tracker.index + 1}/{tracker.images}: writing")
        before = Picture(_nearest(picture.rgb, result.size), None, picture.name)
        results[source] = Result(source, before, result, Settings(
            settings.method, settings.weights, settings.scale, settings.seed, settings.color_fix, {**used, **tiling},
            models.base_for(settings.method, settings.weights)), degradation)
        return result

    done = upscale_all(plan, upscale)
    outcome.errors += done.failures
    outcome.warnings += done.warnings
    for source, target in plan.jobs:
        if source not in results or not target.exists():
            continue
        result = results[source]
        result.output = target
        result.settings_file = write_settings(target, result.settings, source.name)
        outcome.results.append(result)
    report(1.0, "done")
    return outcome


def _nearest(rgb, size: tuple[int, int]):
    from diffsr.images import resize

    return resize(rgb, size, "nearest")


def write_settings(output: Path, settings: Settings, input_name: str) -> Path:
    """`<output>.json`: the settings of `output`, with the command that makes it again."""
    from diffsr.images import write_atomically

    data = {"diffsr": diffsr.__version__, "input": input_name, "output": output.name, **asdict(settings),
            "command": settings.command(input_name)}
    text = json.dumps(data, indent=1, default=list) + "\n"
    path = output.with_name(output.name + ".json")
    write_atomically(path, lambda handle: handle.write(text.encode()))
    return path


def preview(picture: Picture):
    """An 8-bit PIL image for the browser (the download keeps the full bit depth)."""
    return to_pil(picture.rgb, picture.alpha)


def check_method_count(methods: list[str]) -> list[str]:
    if not 2 <= len(methods) <= 4:
        raise UsageError(f"pick two to four methods to compare (picked {len(methods)})")
    return methods


@dataclass
class Panel:
    label: str
    picture: Picture
    scores: dict = field(default_factory=dict)
    note: str = ""


def compare_methods(models: ModelCache, methods: list[str], local: dict[str, str], image: Path,
                    reference: Path | None, scale: float, seed: int, out_dir: Path, metrics=("psnr", "ssim"),
                    report: Callable[[float, str], None] = lambda fraction, text: None) -> list[Panel]:
    """`image` upscaled by each method (release defaults, the local weights where given, else the default
    variant), as panels: the input, the methods, the reference; scored against the reference when one is
    given (diffsr.metrics, through its folder evaluation)."""
    from diffsr.images import write_image
    from diffsr.metrics.evaluate import build_metrics, evaluate

    check_method_count(methods)
    picture = read_image(image, MAX_INPUT_PIXELS)
    gt = read_image(reference, MAX_OUTPUT_PIXELS) if reference is not None else None
    panels: list[Panel] = []
    folders = {}
    for index, method in enumerate(methods):
        report(index / len(methods), f"{method}: loading")
        upscaler = models.get(method, local.get(method))
        report(index / len(methods), f"{method}: upscaling")
        result = upscaler.upscale(picture, scale=scale, seed=seed)
        folders[method] = out_dir / method
        write_image(folders[method] / f"{image.stem}.png", result.rgb, result.alpha)
        panels.append(Panel(method, result))
    if gt is not None:
        report(0.95, "scoring against the reference")
        write_image(out_dir / "reference" / f"{image.stem}.png", gt.rgb, gt.alpha)
        built = build_metrics(list(metrics), models.device, download=False)
        for panel in panels:
            evaluation = evaluate(folders[panel.label], out_dir / "reference", list(metrics), built=built)
            panel.scores = next(iter(evaluation.per_image.values()), {})
            panel.note = "; ".join(evaluation.problems)
        skipped = ", ".join(sorted(built[1]))
        if skipped and panels:
            panels[-1].note = (panels[-1].note + "; " if panels[-1].note else "") + f"not computed: {skipped}"
    size = panels[0].picture.size if panels else picture.size
    before = Panel("input (nearest)", Picture(_nearest(picture.rgb, size), None, picture.name))
    report(1.0, "done")
    return [before, *panels] + ([Panel("reference", gt)] if gt is not None else [])
