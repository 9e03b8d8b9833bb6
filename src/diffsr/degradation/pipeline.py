"""The Real-ESRGAN second-order degradation, with random parameters drawn per sample.

Two steps, so that a pair can be re-made from its recorded parameters:
- `sample_params(config, generator, count)` draws every random choice of each sample as a plain dict
  (JSON-ready), including the seed of its noise;
- `apply_degradation(hr, params, config)` turns a batch of HR images into LR images with them.
`degrade_batch` does both. The reference draws resize, noise type and order once per batch; here every
sample draws its own, so samples of one batch take different sizes in the middle of the pipeline and
that part runs per sample; the full-size blur and the final steps run batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffsr.degradation.config import BlurConfig, DegradationConfig, StageConfig
from diffsr.degradation.jpeg import jpeg
from diffsr.degradation.kernels import filter2d, make_kernels, usm_sharpen
from diffsr.degradation.noise import add_noise

PULSE = {"type": "pulse"}


class _Draws:
    """Random draws from one torch.Generator (CPU, float64): the only source of randomness of the sampler."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def random(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def chance(self, probability: float) -> bool:
        return self.random() < probability

    def choice(self, options: list, probs: list[float] | None = None):
        if probs is None:
            return options[int(torch.randint(len(options), (), generator=self.generator))]
        point, total = self.random() * sum(probs), 0.0
        for option, prob in zip(options, probs):
            total += prob
            if point < total:
                return option
        return options[-1]

    def seed(self) -> int:
        return int(torch.randint(2**62, (), generator=self.generator))


def _sample_kernel(blur: BlurConfig, draw: _Draws) -> dict:
    size = draw.choice(blur.sizes)
    if draw.chance(blur.sinc_prob):
        low, high = blur.sinc_cutoff_small if size < blur.sinc_small_size else blur.sinc_cutoff
        return {"type": "sinc", "size": size, "cutoff": draw.uniform(low, high)}
    kind = draw.choice(blur.types, blur.probs)
    spec = {"type": kind, "size": size, "sigma_x": draw.uniform(*blur.sigma)}
    if kind.endswith("aniso"):
        spec["sigma_y"] = draw.uniform(*blur.sigma)
        spec["theta"] = draw.uniform(*blur.rotation)
    if kind.startswith(("generalized", "plateau")):
        low, high = blur.betag if kind.startswith("generalized") else blur.betap
        # As Real-ESRGAN: below or above 1 (assumes low <= 1 <= high).
        spec["beta"] = draw.uniform(low, 1) if draw.chance(blur.beta_below_one_prob) else draw.uniform(1, high)
    return spec


def _sample_stage(stage: StageConfig, draw: _Draws) -> dict:
    params = {"blur": _sample_kernel(stage.blur, draw) if draw.chance(stage.blur_prob) else None}
    if stage.resize_divisor_range is not None:
        params["resize"] = {"divisor": draw.uniform(*stage.resize_divisor_range)}
    else:
        direction = draw.choice(["up", "down", "keep"], stage.resize_probs)
        low, high = stage.resize_range
        params["resize"] = {"scale": {"up": lambda: draw.uniform(1, high), "down": lambda: draw.uniform(low, 1),
                                      "keep": lambda: 1.0}[direction]()}
    params["resize"]["mode"] = draw.choice(stage.resize_modes)
    if draw.chance(stage.gaussian_noise_prob):
        params["noise"] = {"type": "gaussian", "sigma": draw.uniform(*stage.noise_sigma)}
    else:
        params["noise"] = {"type": "poisson", "scale": draw.uniform(*stage.poisson_scale)}
    params["noise"]["gray"] = draw.chance(stage.gray_noise_prob)
    params["jpeg"] = draw.uniform(*stage.jpeg_range) if stage.jpeg_range is not None else None
    return params


def sample_params(config: DegradationConfig, generator: torch.Generator, count: int = 1) -> list[dict]:
    """Every random choice of `count` samples, drawn in order from `generator` (a CPU torch.Generator)."""
    draw = _Draws(generator)
    samples = []
    for _ in range(count):
        if draw.chance(config.no_degradation_prob):
            samples.append({"degrade": False})
            continue
        params = {"degrade": True, "noise_seed": draw.seed(), "stage1": _sample_stage(config.stage1, draw),
                  "stage2": _sample_stage(config.stage2, draw) if config.stage2 is not None else None}
        final = config.final
        params["final"] = {"resize_first": draw.chance(final.resize_first_prob),
                           "mode": draw.choice(final.resize_modes)}
        if draw.chance(final.sinc_prob):
            params["final"]["sinc"] = {"type": "sinc", "size": draw.choice(final.sinc_sizes),
                                       "cutoff": draw.uniform(*final.sinc_cutoff)}
        else:
            params["final"]["sinc"] = dict(PULSE)
        samples.append(params)
    return samples


def _resize(image: torch.Tensor, mode: str, size=None, scale: float | None = None) -> torch.Tensor:
    if scale is not None:  # F.interpolate maps coordinates with this factor, as the reference's first stage does
        return F.interpolate(image, scale_factor=scale, mode=mode)
    return F.interpolate(image, size=size, mode=mode)


def _jpeg(image: torch.Tensor, quality, config: DegradationConfig) -> torch.Tensor:
    # Clamp first: DiffJPEG on out-of-range values gives unpleasant artifacts (as Real-ESRGAN notes).
    return jpeg(torch.clamp(image, 0, 1), quality, differentiable=config.jpeg_differentiable)


def _middle(image: torch.Tensor, params: dict, config: DegradationConfig, hr_size) -> torch.Tensor:
    """One sample from after the first blur to just before the final step (its size varies with its draws)."""
    generator = torch.Generator(device=image.device).manual_seed(params["noise_seed"])
    stages = [params["stage1"]] + ([params["stage2"]] if params["stage2"] is not None else [])
    for number, stage in enumerate(stages):
        if number > 0 and stage["blur"] is not None:
            image = filter2d(image, make_kernels([stage["blur"]], config.kernel_pad_to, image.device))
        resize = stage["resize"]
        if "divisor" in resize:
            height, width = image.shape[-2:]
            size = (int(height // resize["divisor"]), int(width // resize["divisor"]))
            image = _resize(image, resize["mode"], size=size)
        elif number == 0:
            image = _resize(image, resize["mode"], scale=resize["scale"])
        else:  # later stages resize relative to the LR size, as the reference's second stage
            image = _resize(image, resize["mode"], size=(int(hr_size[0] / config.scale * resize["scale"]),
                                                         int(hr_size[1] / config.scale * resize["scale"])))
        image = add_noise(image, stage["noise"], generator)
        last = number == len(stages) - 1
        if stage["jpeg"] is not None and not last:
            image = _jpeg(image, stage["jpeg"], config)
    return image


def apply_degradation(hr: torch.Tensor, params: list[dict],
                      config: DegradationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR, target) for HR images (B, 3, H, W) in [0, 1] and one params dict per sample.

    LR is (B, 3, H // scale, W // scale); the target is the HR, USM-sharpened if `config.usm.target`.
    """
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected HR images shaped (B, 3, H, W), got {tuple(hr.shape)}")
    if len(params) != hr.shape[0]:
        raise ValueError(f"{len(params)} parameter sets for a batch of {hr.shape[0]}")
    usm = config.usm
    sharpened = usm_sharpen(hr, usm.radius, usm.weight, usm.threshold) if (usm.input or usm.target) else None
    source = sharpened if usm.input else hr
    target = sharpened if usm.target else hr
    height, width = hr.shape[-2:]
    lr_size = (height // config.scale, width // config.scale)
    degraded = [i for i, p in enumerate(params) if p["degrade"]]

    lr = torch.empty(hr.shape[0], 3, *lr_size, dtype=hr.dtype, device=hr.device)
    for i, p in enumerate(params):
        if not p["degrade"]:
            mode = config.no_degradation_mode
            antialias = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
            lr[i] = F.interpolate(source[i:i + 1], size=lr_size, mode=mode, **antialias).clamp(0, 1)[0]
    if not degraded:
        return lr, target

    first_blur = [params[i]["stage1"]["blur"] or dict(PULSE) for i in degraded]
    blurred = filter2d(source[degraded], make_kernels(first_blur, config.kernel_pad_to, hr.device))
    last_jpeg = []
    for row, i in enumerate(degraded):
        p = params[i]
        image = _middle(blurred[row:row + 1], p, config, (height, width))
        last_jpeg.append((p["stage2"] or p["stage1"])["jpeg"])
        if not p["final"]["resize_first"] and last_jpeg[-1] is not None:
            image = _jpeg(image, last_jpeg[-1], config)
        lr[i] = _resize(image, p["final"]["mode"], size=lr_size)[0]

    sincs = make_kernels([params[i]["final"]["sinc"] for i in degraded], config.kernel_pad_to, hr.device)
    out = filter2d(lr[degraded], sincs)
    late = [row for row, i in enumerate(degraded) if params[i]["final"]["resize_first"] and last_jpeg[row] is not None]
    if late:
        out[late] = _jpeg(out[late], [last_jpeg[row] for row in late], config)
    out = torch.clamp(out, 0, 1)
    if config.quantize:
        out = torch.round(out * 255) / 255
    lr[degraded] = out
    return lr, target


def degrade_batch(hr: torch.Tensor, config: DegradationConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Draw parameters for each sample from `generator` and degrade: (LR, target, params)."""
    params = sample_params(config, generator, hr.shape[0])
    lr, target = apply_degradation(hr, params, config)
    return lr, target, params
