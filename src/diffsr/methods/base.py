"""What every method shares: the image -> preprocess -> restore -> color fix -> image flow.

A method subclass supplies `load` (build from base + weights), `preprocess` (input picture -> the LR
tensor the network sees, at processing size) and `restore` (that tensor -> restored image tensor).
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffsr.backbone import Backbone, check_compile_mode
from diffsr import knobs as knobs_module
from diffsr.color import COLOR_FIXES, color_fix
from diffsr.errors import ArgumentTypeError, UsageError
from diffsr.images import (MAX_INPUT_PIXELS, MAX_OUTPUT_PIXELS, Picture, as_picture, check_pixels, image_size, resize,
                           tensor_to_array, to_pil)
from diffsr.progress import Callback, Progress
from diffsr.tiling import TILING_KNOBS, TilingOptions

MIN_SCALE, MAX_SCALE = 1, 8


@dataclass
class Prepared:
    """The network's input and what is needed to bring its output back to the requested size."""

    lr: torch.Tensor  # (1, 3, h, w) in [0, 1], processing size
    out_size: tuple[int, int]  # (width, height) the user asked for


def output_size(picture: Picture, scale: float) -> tuple[int, int]:
    return scaled_size(*picture.size, scale)


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of the output of a width x height input at `scale`."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ArgumentTypeError(f"scale must be a number, not {type(scale).__name__} {scale!r}")
    if not MIN_SCALE <= scale <= MAX_SCALE:  # NaN fails this too
        raise UsageError(f"scale {scale} is out of range (choose {MIN_SCALE} to {MAX_SCALE})")
    return float(scale)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentTypeError(f"seed must be an integer, not {type(seed).__name__} {seed!r}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UsageError(f"seed {seed} is out of range (-2**63 to 2**64 - 1)")
    return int(seed)


def check_pixel_limit(limit, name: str) -> int | None:
    """A pixel limit: a positive integer, or None for none."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer number of pixels or None, not {type(limit).__name__}")
    if limit < 1:
        raise UsageError(f"{name} must be at least 1, got {limit}")
    return int(limit)


def read_input(image, scale: float, max_input_pixels: int | None, max_output_pixels: int | None) -> Picture:
    """The input as a Picture, refused (one ImageError line) when it or its output at `scale` is over the
    pixel limits; for a file, both are checked from its header before it is decoded."""
    if isinstance(image, (str, Path)):
        height, width = image_size(image)
        check_pixels(image, width, height, max_input_pixels)
        check_pixels(image, *scaled_size(width, height, scale), max_output_pixels, "output")
        return as_picture(image)  # both limits checked above
    picture = as_picture(image, max_input_pixels)
    check_pixels(picture.name, *output_size(picture, scale), max_output_pixels, "output")
    return picture


class Upscaler:
    """Base class of the four methods. Call it: `upscaler(image, scale=4, seed=0, **knobs) -> PIL.Image`."""

    name: str = ""
    default_base: str = ""
    default_color_fix: str = "adain"
    output_resample: str = "bicubic"  # the filter that brings the restored image to the output size
    # True: the colour fix sees the restored image clamped to [0, 1]; False: as `restore` returns it (unclamped,
    # as CCSR v1's release colour-fixes its decoded image), clamped only after the fix
    clamp_before_color_fix: bool = True
    weights_name: str = ""  # the release's file name, for messages
    Knobs: type[knobs_module.Knobs] = knobs_module.Knobs  # the per-call knobs (diffsr.knobs): each method declares its own

    backbone: "Backbone"  # set by each method's __init__

    # Derived from the modules (as diffusers and spandrel do), never stored: a trainer or accelerate that
    # moves or casts the modules moves these with them.
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    def networks(self) -> list[torch.nn.Module]:
        """Every network this upscaler runs: the backbone's and the method's own (ControlNet, DE-Net, ...)."""
        found = [self.backbone.unet, self.backbone.vae, self.backbone.text_encoder]
        return found + [value for value in vars(self).values()
                        if isinstance(value, torch.nn.Module) and all(value is not known for known in found)]

    def compile(self, mode: str = "default") -> None:
        """torch.compile, in place and in torch's `mode`, the networks the flow calls whole: the UNet, the VAE's
        encoder and decoder (the tiled VAE modes run their blocks uncompiled) and the method's own; not the text
        encoder, which runs once per prompt. Each new input shape, dtype or device compiles again on first use."""
        check_compile_mode(mode)
        vae = self.backbone.vae
        for net in self.networks():
            if net is not self.backbone.text_encoder:
                for module in ((vae.encoder, vae.decoder) if net is vae else (net,)):
                    module.compile(mode=mode)

    # -- what a method supplies ------------------------------------------------------------------
    @classmethod
    def load(cls, base: str | Path, weights: str | Path, device, dtype, **options) -> "Upscaler":
        raise NotImplementedError

    @classmethod
    def unused_extras(cls, options: dict) -> frozenset:
        """Load options naming registry extras that `options` leave unused (not fetched for them)."""
        return frozenset()

    @classmethod
    def convert_weights(cls, weights: Path, base: str | Path, out_file: Path) -> None:
        raise UsageError(f"{cls.name} weights load directly; there is nothing to convert")

    def preprocess(self, picture: Picture, scale: float) -> Prepared:
        raise NotImplementedError

    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions, **knobs) -> torch.Tensor:
        """The restored image in [0, 1] (values outside are left for the flow to clamp when
        `clamp_before_color_fix` is False), `lr`'s size at the top left; a method may return a margin beyond it
        (see `color_reference`), which the flow crops after the colour fix. `tiling` says how to split work that
        does not fit (diffsr.tiling); the method passes it on to tiling.vae_encode / aggregate / vae_decode."""
        raise NotImplementedError

    def color_reference(self, lr: torch.Tensor) -> torch.Tensor:
        """What the colour fix matches `restore`'s output to: `lr`, with the margin `restore` returns beyond it."""
        return lr

    # -- the shared flow -------------------------------------------------------------------------
    def check_knobs(self, knobs: dict) -> None:
        """Reject unknown knobs by name (a typo must not silently do nothing), then check the values once."""
        allowed = set(self.knob_names()) | set(TILING_KNOBS)
        unknown = sorted(set(knobs) - allowed)
        if unknown:
            raise UsageError(f"{self.name} has no option {', '.join(unknown)} (options: {', '.join(sorted(allowed))})")
        self.settings(knobs)

    def knob_defaults(self) -> dict:
        """This model's defaults over the Knobs fields' own: a released variant's values, load-time options."""
        return {}

    def settings(self, given: dict) -> knobs_module.Knobs:
        """One call's knobs (the tiling ones aside), checked: given values over `knob_defaults()`."""
        return self.Knobs.from_call({k: v for k, v in given.items() if k not in TILING_KNOBS}, self.knob_defaults())

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """The knobs `upscale` takes besides the tiling ones (known without loading, for the command line)."""
        return cls.Knobs.names()

    @classmethod
    def load_option_names(cls) -> tuple[str, ...]:
        """The options `load` takes besides base, weights, device and dtype (e.g. merge_lora)."""
        parameters = inspect.signature(cls.load).parameters.values()
        return tuple(p.name for p in parameters
                     if p.name not in ("base", "weights", "device", "dtype") and p.kind != p.VAR_KEYWORD)

    def check_arguments(self, scale, seed, color_fix: str | None, knobs: dict) -> tuple[float, int, str]:
        """Every argument of an upscale call checked once, before any work: (scale, seed, color fix)."""
        scale, seed = check_scale(scale), check_seed(seed)
        fix = color_fix or self.default_color_fix
        if not isinstance(fix, str) or fix not in COLOR_FIXES:
            raise UsageError(f"unknown color fix '{fix}' (choose {', '.join(COLOR_FIXES)})")
        self.check_knobs(knobs)
        TilingOptions.from_knobs(dict(knobs))
        return scale, seed, fix

    def denoiser_passes(self, knobs: dict) -> int:
        """Whole-latent denoiser passes one image takes with `knobs` (sampler steps; two per step where the
        method guides with separate calls), so progress knows its total from the start."""
        return 1

    def prepare_knobs(self, picture: Picture, knobs: dict) -> dict:
        """Knobs that depend on the input picture (S3Diff estimates its degradation here)."""
        return knobs

    @torch.no_grad()
    def upscale(self, image, scale: float = 4, seed: int = 0, color_fix: str | None = None,
                max_input_pixels: int | None = MAX_INPUT_PIXELS, max_output_pixels: int | None = MAX_OUTPUT_PIXELS,
                callback: Callback | None = None, **knobs) -> Picture:
        """Upscale and return a Picture in the input's bit depth (alpha upscaled separately), with the input's
        ICC profile and EXIF. Inputs or outputs over the pixel limits (None: no limit) are refused.
        `callback(Step)` hears of every unit of work done (diffsr.progress: encode, denoise, decode)."""
        scale, seed, fix = self.check_arguments(scale, seed, color_fix, knobs)
        limits = check_pixel_limit(max_input_pixels, "max_input_pixels"), check_pixel_limit(max_output_pixels,
                                                                                             "max_output_pixels")
        picture = read_input(image, scale, *limits)
        knobs = self.prepare_knobs(picture, dict(knobs))
        tiling = replace(TilingOptions.from_knobs(knobs), progress=Progress(callback, self.denoiser_passes(knobs)))
        prepared = self.preprocess(picture, scale)
        lr = prepared.lr.to(self.device, torch.float32)
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
        restored = self.restore(lr, generator, tiling=tiling, **knobs).float()
        restored = color_fix_and_clamp(restored, self.color_reference(lr), fix, self.clamp_before_color_fix)
        restored = restored[..., :lr.shape[-2], :lr.shape[-1]]
        depth = picture.rgb.dtype
        rgb = self.quantize(restored, np.uint16 if depth == np.uint16 else np.uint8)
        rgb = resize(rgb, prepared.out_size, self.output_resample)
        alpha = None if picture.alpha is None else resize(picture.alpha, prepared.out_size, "bicubic")
        return Picture(rgb, alpha, picture.name, picture.icc_profile, picture.exif)

    def quantize(self, image: torch.Tensor, dtype) -> np.ndarray:
        """The restored [0, 1] image as an HxWx3 array of `dtype` (rounded), before the resize to the output size."""
        return tensor_to_array(image, dtype)

    def __call__(self, image, scale: float = 4, seed: int = 0, **knobs):
        """Upscale one image (path, PIL, uint8/uint16 array or [0,1] tensor); returns a PIL.Image."""
        result = self.upscale(image, scale=scale, seed=seed, **knobs)
        return to_pil(result.rgb, result.alpha)


def color_fix_and_clamp(restored: torch.Tensor, lr: torch.Tensor, method: str,
                        clamp_first: bool = True) -> torch.Tensor:
    """Clamp (unless not `clamp_first`), colour-fix and clamp; works in place on `restored` (large images: no
    extra copies)."""
    if clamp_first:
        restored.clamp_(0, 1)
    return color_fix(restored, lr, method).clamp_(0, 1)
