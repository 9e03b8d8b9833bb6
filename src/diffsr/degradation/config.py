"""Settings of the Real-ESRGAN second-order degradation: every value is a field, YAML files override them.

The defaults are Real-ESRGAN's x4 settings (options/train_realesrgan_x4plus.yml); `configs/degradation/`
holds the YAML files for Real-ESRGAN x4, S3Diff's milder set and OSEDiff-face.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffsr.errors import UsageError, first_line

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")


@dataclass
class BlurConfig:
    """One random blur kernel per sample: a mixed Gaussian-family kernel or, with `sinc_prob`, a sinc."""

    sizes: list[int] = field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])  # odd, chosen uniformly
    types: list[str] = field(default_factory=lambda: list(KERNEL_TYPES))
    probs: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sigma: list[float] = field(default_factory=lambda: [0.2, 3.0])  # both axes of anisotropic kernels
    rotation: list[float] = field(default_factory=lambda: [-math.pi, math.pi])
    betag: list[float] = field(default_factory=lambda: [0.5, 4.0])  # generalized Gaussian shape
    betap: list[float] = field(default_factory=lambda: [1.0, 2.0])  # plateau shape
    beta_below_one_prob: float = 0.5  # beta is uniform in [low, 1] with this probability, else in [1, high]
    sinc_prob: float = 0.1
    # Sinc cutoff omega_c: small kernels get a higher floor so that they do not ring too much.
    sinc_small_size: int = 13  # kernels smaller than this use sinc_cutoff_small
    sinc_cutoff_small: list[float] = field(default_factory=lambda: [math.pi / 3, math.pi])
    sinc_cutoff: list[float] = field(default_factory=lambda: [math.pi / 5, math.pi])


@dataclass
class StageConfig:
    """blur -> random resize -> noise -> JPEG (the second stage resizes relative to HR size / scale)."""

    blur: BlurConfig = field(default_factory=BlurConfig)
    blur_prob: float = 1.0
    resize_probs: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])  # up, down, keep
    resize_range: list[float] = field(default_factory=lambda: [0.15, 1.5])
    # If set, the image is instead shrunk by a divisor uniform in this range (CodeFormer's face degradation).
    resize_divisor_range: list[float] | None = None
    resize_modes: list[str] = field(default_factory=lambda: ["area", "bilinear", "bicubic"])
    gaussian_noise_prob: float = 0.5  # else Poisson noise
    noise_sigma: list[float] = field(default_factory=lambda: [1.0, 30.0])  # on the 0..255 scale
    poisson_scale: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    # None: no JPEG. The last stage's JPEG is the one that the final step orders with [resize + sinc].
    jpeg_range: list[float] | None = field(default_factory=lambda: [30.0, 95.0])


def _second_stage() -> StageConfig:
    return StageConfig(
        blur=BlurConfig(sigma=[0.2, 1.5]), blur_prob=0.8, resize_probs=[0.3, 0.4, 0.3], resize_range=[0.3, 1.2],
        noise_sigma=[1.0, 25.0], poisson_scale=[0.05, 2.5])


@dataclass
class FinalConfig:
    """[Resize to HR/scale + final sinc] and the last stage's JPEG, in random order."""

    resize_first_prob: float = 0.5  # else JPEG first
    resize_modes: list[str] = field(default_factory=lambda: ["area", "bilinear", "bicubic"])
    sinc_prob: float = 0.8  # else a pulse (no filtering)
    sinc_sizes: list[int] = field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    sinc_cutoff: list[float] = field(default_factory=lambda: [math.pi / 3, math.pi])


@dataclass
class UsmConfig:
    """Unsharp masking of the HR: Real-ESRGAN degrades the sharpened HR and trains on it; the diffusion methods do not."""

    input: bool = False  # degrade the sharpened HR
    target: bool = False  # return the sharpened HR as the target
    radius: int = 50
    weight: float = 0.5
    threshold: float = 10.0  # on the 0..255 scale


@dataclass
class DegradationConfig:
    scale: int = 4  # LR size = HR size // scale
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig | None = field(default_factory=_second_stage)  # None: first-order degradation
    final: FinalConfig = field(default_factory=FinalConfig)
    usm: UsmConfig = field(default_factory=UsmConfig)
    kernel_pad_to: int = 21  # kernels are stored padded to this size (must cover every kernel size)
    no_degradation_prob: float = 0.0  # LR is then a plain downscale of the HR, with no_degradation_mode
    no_degradation_mode: str = "bicubic"
    quantize: bool = True  # round the LR to 8 bits at the end
    jpeg_differentiable: bool = False  # cubic rounding inside JPEG (gradients); Real-ESRGAN uses plain rounding

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "DegradationConfig":
        stages = [("stage1", self.stage1)] + ([("stage2", self.stage2)] if self.stage2 is not None else [])
        for name, stage in stages:
            blur = stage.blur
            _check(len(blur.types) == len(blur.probs), f"{name}.blur: types and probs differ in length")
            _check(all(t in KERNEL_TYPES for t in blur.types), f"{name}.blur.types: unknown type in {blur.types}")
            _check(all(s % 2 == 1 and 0 < s <= self.kernel_pad_to for s in blur.sizes),
                   f"{name}.blur.sizes: kernel sizes must be odd and at most kernel_pad_to={self.kernel_pad_to}")
            _check(len(stage.resize_probs) == 3, f"{name}.resize_probs: need three values (up, down, keep)")
            _check(all(m in RESIZE_MODES for m in stage.resize_modes), f"{name}.resize_modes: one of {RESIZE_MODES}")
        _check(all(s % 2 == 1 and 0 < s <= self.kernel_pad_to for s in self.final.sinc_sizes),
               "final.sinc_sizes: kernel sizes must be odd and at most kernel_pad_to")
        _check(all(m in RESIZE_MODES for m in self.final.resize_modes), f"final.resize_modes: one of {RESIZE_MODES}")
        _check(self.scale >= 1, f"scale must be at least 1, got {self.scale}")
        _check(self.no_degradation_mode in RESIZE_MODES, f"no_degradation_mode: one of {RESIZE_MODES}")
        return self


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(f"degradation config: {message}")


def _merge(instance, overrides: dict, where: str):
    """Return a copy of the dataclass `instance` with the values of `overrides` (nested dicts for nested configs)."""
    if not isinstance(overrides, dict):
        raise UsageError(f"degradation config: {where or 'top level'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(instance)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise UsageError(f"degradation config: unknown key {where + '.' if where else ''}{key} "
                             f"(known: {', '.join(fields)})")
        current = getattr(instance, key)
        if key in ("stage1", "stage2") and value is not None and current is None:
            current = _second_stage()
        if dataclasses.is_dataclass(current) and value is not None:
            value = _merge(current, value, f"{where + '.' if where else ''}{key}")
        changes[key] = value
    return dataclasses.replace(instance, **changes)


def config_from_dict(overrides: dict | None) -> DegradationConfig:
    return _merge(DegradationConfig(), overrides or {}, "").validate()


BUNDLED_DIR = Path(__file__).resolve().parents[3] / "configs" / "degradation"


def load_config(source: str | Path | dict | DegradationConfig | None = None) -> DegradationConfig:
    """A config from a YAML file, a bundled name ("realesrgan_x4", "s3diff", "osediff_face"), a dict, or defaults."""
    if source is None:
        return DegradationConfig().validate()
    if isinstance(source, DegradationConfig):
        return source.validate()
    if isinstance(source, dict):
        return config_from_dict(source)
    path = Path(source)
    if not path.exists() and (BUNDLED_DIR / f"{source}.yaml").exists():
        path = BUNDLED_DIR / f"{source}.yaml"
    if not path.is_file():
        raise UsageError(f"{source}: no such degradation config (a YAML file or one of: "
                         f"{', '.join(sorted(p.stem for p in BUNDLED_DIR.glob('*.yaml')))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({first_line(error)})") from None
    return config_from_dict(data)
