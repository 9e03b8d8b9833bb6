"""diffsr: real-world image super-resolution with diffusion priors.

    import diffsr
    up = diffsr.load_upscaler("osediff")     # the released weights and base, fetched by name on first use
    image = up(lr_image, scale=4, seed=0)
"""

from __future__ import annotations

import inspect
from pathlib import Path

from diffsr.errors import (ArgumentTypeError, BaseModelError, DiffsrError, ImageError, OutputError, UsageError,
                           WeightsError)
from diffsr.methods import get_method, list_methods
from diffsr.methods.base import Upscaler

__version__ = "0.1.0"
__all__ = ["load_upscaler", "list_methods", "Upscaler", "DiffsrError", "ImageError", "OutputError", "WeightsError",
           "BaseModelError", "UsageError", "ArgumentTypeError", "__version__"]


def load_upscaler(method: str, base: str | Path | None = None, weights: str | Path | None = None,
                  device: str = "cpu", dtype: str = "auto", offline: bool | None = None,
                  progress: bool = True, winograd: bool = True, compile: str | None = None,
                  **options) -> Upscaler:
    """Build `method` on the Stable Diffusion `base` with the authors' released `weights`.

    `base` and `weights` are registry names (`diffsr weights list`), local paths, or for `base` a hub id;
    left out, the method's default weights, the base they were trained on and the files they need beside
    them come from the weights registry (fetched and checked on first use; offline=True or HF_HUB_OFFLINE=1:
    the cache only). Options are method knobs fixed at load time (e.g. merge_lora=True).
    winograd: on the CPU in float32, run 3x3 convolutions by NNPACK's Winograd transform (1.6-2.1x faster
    per image, output within float32 rounding of direct convolution: diffsr.nets.winograd); False: direct.
    compile: None (default), or a torch.compile mode ("default", "reduce-overhead": CUDA graphs on a GPU,
    "max-autotune", ...) for the UNet, the VAE's encoder and decoder and the method's networks
    (Upscaler.compile); the first image of each size pays the compilation. Winograd is off when compiling (torch's
    compiler cannot trace NNPACK's convolution).
    Bad arguments are refused here, before anything is read or fetched: UsageError, or ArgumentTypeError for a
    wrong type."""
    import torch

    from diffsr.backbone import check_compile_mode, resolve_device, resolve_dtype

    if not isinstance(method, str):
        raise ArgumentTypeError(f"method must be a name such as 'osediff', not {type(method).__name__}")
    for name, value in (("base", base), ("weights", weights)):
        if value is not None and not isinstance(value, (str, Path)):
            raise ArgumentTypeError(f"{name} must be a registry name, a path or a hub id, not {type(value).__name__}")
    if not isinstance(device, (str, torch.device)):
        raise ArgumentTypeError(f"device must be a name such as 'cpu' or 'cuda', not {type(device).__name__}")
    if not isinstance(winograd, bool):
        raise ArgumentTypeError(f"winograd must be True or False, not {type(winograd).__name__}")
    if compile is not None:
        check_compile_mode(compile)
    if not isinstance(dtype, (str, torch.dtype)):
        raise ArgumentTypeError(f"dtype must be a name such as 'float32', not {type(dtype).__name__}")
    resolve_device(device)
    resolve_dtype(dtype, device)
    process_size = options.get("process_size")
    if process_size is not None:
        if isinstance(process_size, bool) or not isinstance(process_size, int):
            raise ArgumentTypeError(f"process_size must be a whole number of pixels, not {type(process_size).__name__}")
        if process_size < 8:
            raise UsageError(f"process_size {process_size} must be at least 8 pixels")
    cls = get_method(method)
    allowed = cls.load_option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.load).parameters.values()):
        raise UsageError(f"{cls.name} has no load option {', '.join(unknown)} (options: {', '.join(allowed)})")
    from diffsr.weights import resolve_method

    resolved = resolve_method(cls.name, base, weights, options, default_base=cls.default_base, offline=offline,
                              progress=progress, convert=cls.convert_weights,
                              unused_extras=cls.unused_extras(options))
    upscaler = cls.load(resolved.base, resolved.weights, device=device, dtype=dtype, **resolved.options)
    from diffsr.tiling import trim_heap

    trim_heap()  # the loading buffers, freed, back to the system (glibc keeps them otherwise)
    if compile is not None:
        upscaler.compile(compile)
    elif winograd and upscaler.device.type == "cpu" and upscaler.dtype == torch.float32:
        from diffsr.nets.winograd import use_winograd

        use_winograd(upscaler.networks())
    return upscaler
