"""diffsr: real-world image super-resolution with diffusion priors.

    import diffsr
    up = diffsr.load_upscaler("osediff", base="stabilityai/stable-diffusion-2-1-base", weights="osediff.pkl")
    image = up(lr_image, scale=4, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from diffsr.errors import BaseModelError, DiffsrError, ImageError, UsageError, WeightsError
from diffsr.methods import get_method, list_methods
from diffsr.methods.base import Upscaler

__version__ = "0.1.0"
__all__ = ["load_upscaler", "list_methods", "Upscaler", "DiffsrError", "ImageError", "WeightsError",
           "BaseModelError", "UsageError", "__version__"]


def load_upscaler(method: str, base: str | Path | None = None, weights: str | Path | None = None,
                  device: str = "cpu", dtype: str = "float32", **options) -> Upscaler:
    """Build `method` on the Stable Diffusion `base` (hub id or local diffusers folder) with the authors'
    released `weights`. Options are method knobs fixed at load time (e.g. merge_lora=True)."""
    cls = get_method(method)
    return cls.load(base or cls.default_base, weights, device=device, dtype=dtype, **options)
