"""What CCSR's two releases do their own way around the one denoiser (methods/ccsr.py): their defaults, their
input sizes and their random draws. v2: branch CCSR-v2.0, test_ccsr_tile.py (diffusers pipeline); v1: branch
CCSR-v1.0, inference_ccsr.py (LDM sampler, model/q_sampler.py)."""

from __future__ import annotations

import math

import numpy as np
import torch

from diffsr.images import resize
from diffsr.samplers import TRUNCATED_START_T, TruncatedSchedule, noise_sampler, q_sample, randn

# The release scripts' knob values (v2: one step).
V2_DEFAULTS = dict(steps=1, t_max=0.6666, t_min=0.0, guidance_scale=1.0, prompt="clean, high-resolution, 8k",
                   negative_prompt="blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed")
V1_DEFAULTS = dict(steps=45, t_max=0.6667, t_min=0.3333, guidance_scale=1.0, prompt="", negative_prompt="")
# When each release skips classifier-free guidance: v1 at scale 1, v2 up to 1 (its pipeline guides only above 1).
GUIDANCE_OFF = {1: lambda scale: scale == 1, 2: lambda scale: scale <= 1}


def processing_image(rgb: np.ndarray, scale: float, process_size: int, version: int) -> np.ndarray:
    """The input at the size the release processes. v2: enlarge inputs whose short side is below
    process_size // scale, resize by `scale`, then down to a multiple of 8 (PIL bicubic throughout). v1: resize by
    `scale` (size rounded up), enlarge to a short side of process_size, then to a multiple of 64 (Lanczos)."""
    size = rgb.shape[1], rgb.shape[0]
    if version == 2:
        if min(size) < process_size // scale:
            rgb, size = _grown(rgb, size, process_size // scale / min(size), round)
        rgb, size = _grown(rgb, size, scale, round)
    else:
        rgb, size = _grown(rgb, size, scale, math.ceil)
        if min(size) < process_size:
            rgb, size = _grown(rgb, size, process_size / min(size), math.ceil)
    multiple, last_filter = (8, "bicubic") if version == 2 else (64, "lanczos")
    return resize(rgb, (size[0] // multiple * multiple, size[1] // multiple * multiple), last_filter)


def _grown(rgb: np.ndarray, size: tuple[int, int], factor: float, rounding) -> tuple[np.ndarray, tuple[int, int]]:
    size = (rounding(factor * size[0]), rounding(factor * size[1]))
    return resize(rgb, size, "bicubic"), size


def v2_draws(posterior, scaling: float, rows: int, sample_posterior: bool, schedule: TruncatedSchedule,
             generator: torch.Generator, like: torch.Tensor):
    """v2's condition latents (`rows`: one per CFG branch, each encoded and sampled on its own), start latent and
    noise samplers, as its pipeline draws them: `generator` (the pipeline's) draws the start noise and each DDPM
    step's; a second generator of the same seed (the release's global RNG after set_seed) the posterior samples and
    the re-noising noise. Returns (condition, start, renoise, step_noise)."""
    second = torch.Generator(device=generator.device).manual_seed(generator.initial_seed())
    shape = (rows, *posterior.mean.shape[1:])
    start_noise = randn((1, *shape[1:]), generator, like)
    condition = posterior.mean.float().expand(shape)
    if sample_posterior:
        condition = condition + posterior.std.float() * randn(shape, second, like)
    condition = condition * scaling
    # The release draws its start timestep, and the first estimate's, with torch.randint(999, 1000) from the same
    # RNG: always 999, but the draws advance the RNG before the re-noising noise.
    for _ in range(1 + (schedule.start_t is not None)):
        torch.randint(TRUNCATED_START_T, TRUNCATED_START_T + 1, (1,), generator=second, device=second.device)
    start = q_sample(condition[:1], start_noise, schedule.start_alpha_bar)
    return condition, start, noise_sampler(second), noise_sampler(generator)


def v1_draws(posterior, scaling: float, generator: torch.Generator):
    """v1's condition latent (the posterior mode), start noise and noise samplers: one generator draws, in order, the
    start noise, a draw the release makes and discards (p_sample_tao), the re-noising noise and each step's noise.
    Returns (condition, start, renoise, step_noise)."""
    condition = posterior.mode().float() * scaling
    step_noise = noise_sampler(generator)
    start = step_noise(condition)
    return condition, start, lambda x: (step_noise(x), step_noise(x))[1], step_noise


def v1_quantized(image: torch.Tensor) -> np.ndarray:
    """v1's 8 bits: inference_ccsr.py truncates ((x * 255).astype(np.uint8)) before its Lanczos resize."""
    return (image[0].detach().float().cpu().clamp(0, 1) * 255).permute(1, 2, 0).numpy().astype(np.uint8)
