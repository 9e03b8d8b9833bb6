"""diffsr: real-world image super-resolution with diffusion priors.

    import diffsr
    up = diffsr.load_upscaler("osediff")     # the released weights and base, fetched by name on first use
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
                  device: str = "cpu", dtype: str = "float32", offline: bool | None = None,
                  progress: bool = True, **options) -> Upscaler:
    """Build `method` on the Stable Diffusion `base` with the authors' released `weights`.

    `base` and `weights` are registry names (`diffsr weights list`), local paths, or for `base` a hub id;
    left out, the method's default weights, the base they were trained on and the files they need beside
    them come from the weights registry (fetched and checked on first use; offline=True or HF_HUB_OFFLINE=1:
    the cache only). Options are method knobs fixed at load time (e.g. merge_lora=True)."""
    from diffsr.weights import resolve_method

    cls = get_method(method)
    resolved = resolve_method(cls.name, base, weights, options, default_base=cls.default_base, offline=offline,
                              progress=progress)
    return cls.load(resolved.base, resolved.weights, device=device, dtype=dtype, **resolved.options)
