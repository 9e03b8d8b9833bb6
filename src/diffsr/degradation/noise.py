"""Gaussian and Poisson noise, colour or gray, per sample, drawn from a given torch.Generator.

Draw order (gray plane first, then nothing else) follows BasicSR's `*_pt` functions for one sample, so
the same generator state gives the same noise as the reference.
"""

from __future__ import annotations

import math

import torch

# torchvision's rgb_to_grayscale weights, which BasicSR's Poisson gray noise uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def gaussian_noise(images: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Noise for a batch sharing one sigma (0..255 scale); a gray plane repeated on the channels if `gray`."""
    b, c, h, w = images.shape
    shape = (b, 1, h, w) if gray else (b, c, h, w)
    normal = torch.randn(shape, generator=generator, dtype=images.dtype, device=images.device)
    return (normal * sigma / 255.0).expand(b, c, h, w)


def _poisson_counts(plane: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise of 8-bit-rounded `plane`, with the photon count set by its number of distinct values."""
    plane = torch.clamp((plane * 255.0).round(), 0, 255) / 255.0
    # Photon count: the number of distinct values of each sample, rounded up to a power of two
    # (counted with a histogram of the 256 levels: the same count as torch.unique, without a sort).
    codes = (plane * 255.0).round().to(torch.int64).flatten(1)
    distinct = [int(torch.bincount(c, minlength=256).count_nonzero()) for c in codes]
    levels = [2.0 ** math.ceil(math.log2(n)) for n in distinct]
    levels = torch.tensor(levels, dtype=plane.dtype, device=plane.device).view(-1, 1, 1, 1)
    return torch.poisson(plane * levels, generator=generator) / levels - plane


def poisson_noise(images: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    b, c, h, w = images.shape
    plane = to_gray(images) if gray else images
    return (_poisson_counts(plane, generator) * scale).expand(b, c, h, w)


def add_noise(images: torch.Tensor, spec: dict, generator: torch.Generator) -> torch.Tensor:
    """images + noise, clipped to [0, 1].

    spec: {"type": "gaussian", "sigma", "gray"} (sigma on the 0..255 scale) or {"type": "poisson", "scale", "gray"}.
    """
    if spec["type"] == "gaussian":
        noise = gaussian_noise(images, spec["sigma"], spec["gray"], generator)
    else:
        noise = poisson_noise(images, spec["scale"], spec["gray"], generator)
    return torch.clamp(images + noise, 0, 1)
