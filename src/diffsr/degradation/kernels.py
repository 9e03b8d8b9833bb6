"""Blur kernels of the Real-ESRGAN pipeline, made for a whole batch at once, and filtering with them.

Every kernel is centred in a `pad_to` x `pad_to` array (zeros outside its own size), as in Real-ESRGAN,
so that a batch of kernels of mixed sizes and types is one tensor. Kernels are computed in float64
(the reference uses NumPy float64) and returned as float32.
"""

from __future__ import annotations

import math

import kornia
import torch

GAUSSIAN_FAMILY = {"iso": "gaussian", "aniso": "gaussian", "generalized_iso": "generalized",
                   "generalized_aniso": "generalized", "plateau_iso": "plateau", "plateau_aniso": "plateau"}


def _grid(pad_to: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x (columns) and y (rows) offsets from the centre, each (pad_to, pad_to) float64."""
    axis = torch.arange(pad_to, dtype=torch.float64, device=device) - (pad_to - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _size_mask(sizes: torch.Tensor, pad_to: int) -> torch.Tensor:
    """(B, pad_to, pad_to) bool: True inside each sample's centred size x size square."""
    x, y = _grid(pad_to, sizes.device)
    half = ((sizes.to(torch.float64) - 1) / 2)[:, None, None]
    return (x.abs() <= half) & (y.abs() <= half)


def make_kernels(specs: list[dict], pad_to: int = 21, device="cpu") -> torch.Tensor:
    """Kernels (B, pad_to, pad_to) float32 for a list of kernel specs, each one of

    - {"type": "iso" | "aniso" | "generalized_iso" | ... | "plateau_aniso", "size", "sigma_x", "sigma_y",
       "theta", "beta"} (sigma_y/theta ignored for isotropic types, beta for plain Gaussians),
    - {"type": "sinc", "size", "cutoff"} (circular low-pass), or {"type": "pulse"} (identity).
    """
    count = len(specs)
    if count == 0:
        return torch.zeros(0, pad_to, pad_to, device=device)
    target, device = device, "cpu"  # tiny: made in float64 on the CPU (not every device has float64), then moved
    f64 = dict(dtype=torch.float64, device=device)
    kind = [s["type"] for s in specs]
    sizes = torch.tensor([s.get("size", 1) for s in specs], device=device)
    x, y = _grid(pad_to, device)
    x, y = x.expand(count, -1, -1), y.expand(count, -1, -1)

    # Quadratic form [x y] Sigma^-1 [x y]^T with Sigma = R diag(sx^2, sy^2) R^T, R the rotation by theta.
    isotropic = torch.tensor([t.endswith("_iso") or t == "iso" for t in kind], device=device)
    sigma_x = torch.tensor([s.get("sigma_x", 1.0) for s in specs], **f64)
    sigma_y = torch.where(isotropic, sigma_x, torch.tensor([s.get("sigma_y", 1.0) for s in specs], **f64))
    theta = torch.where(isotropic, torch.zeros_like(sigma_x), torch.tensor([s.get("theta", 0.0) for s in specs], **f64))
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    along = cos * x + sin * y  # coordinates in the kernel's own axes
    across = -sin * x + cos * y
    quadratic = along**2 / (sigma_x**2)[:, None, None] + across**2 / (sigma_y**2)[:, None, None]
    beta = torch.tensor([s.get("beta", 1.0) for s in specs], **f64)[:, None, None]

    family = [GAUSSIAN_FAMILY.get(t, t) for t in kind]
    is_family = {name: torch.tensor([f == name for f in family], device=device)[:, None, None]
                 for name in ("gaussian", "generalized", "plateau", "sinc", "pulse")}
    kernels = torch.zeros(count, pad_to, pad_to, **f64)
    kernels = torch.where(is_family["gaussian"], torch.exp(-0.5 * quadratic), kernels)
    kernels = torch.where(is_family["generalized"], torch.exp(-0.5 * quadratic.pow(beta)), kernels)
    kernels = torch.where(is_family["plateau"], 1 / (quadratic.pow(beta) + 1), kernels)

    # Circular low-pass: cutoff * J1(cutoff r) / (2 pi r), and its limit cutoff^2 / (4 pi) at r = 0.
    cutoff = torch.tensor([s.get("cutoff", math.pi) for s in specs], **f64)[:, None, None]
    radius = torch.sqrt(x**2 + y**2)
    sinc = cutoff * torch.special.bessel_j1(cutoff * radius) / (2 * math.pi * radius.clamp_min(1e-300))
    sinc = torch.where(radius == 0, cutoff**2 / (4 * math.pi), sinc)
    kernels = torch.where(is_family["sinc"], sinc, kernels)

    centre = (x == 0) & (y == 0)
    kernels = torch.where(is_family["pulse"], centre.to(torch.float64), kernels)
    kernels = torch.where(_size_mask(torch.where(is_family["pulse"][:, 0, 0], 1, sizes), pad_to), kernels, 0.0)
    return (kernels / kernels.sum(dim=(1, 2), keepdim=True)).float().to(target)


def kernel_sizes(kernels: torch.Tensor) -> list[int]:
    """The odd support size of each padded kernel (1 for a pulse)."""
    pad_to = kernels.shape[-1]
    nonzero = kernels.abs().amax(dim=1).ne(0) | kernels.abs().amax(dim=2).ne(0)  # (B, pad_to)
    index = torch.arange(pad_to, device=kernels.device)
    first = torch.where(nonzero, index, pad_to).amin(dim=1)
    return [max(1, pad_to - 2 * int(f)) for f in first.tolist()]


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each image with its own kernel (or one kernel for all), reflect-padded: BasicSR's filter2D.

    Samples are grouped by their kernel's true size, so a 7x7 kernel padded to 21x21 costs a 7x7 filter
    (same result: the padded taps are zero) and a pulse costs nothing.
    """
    if kernels.ndim == 2:
        kernels = kernels[None]
    kernels = kernels.to(images.dtype)
    if kernels.shape[0] == 1 and images.shape[0] > 1:
        kernels = kernels.expand(images.shape[0], -1, -1)
    sizes = kernel_sizes(kernels)
    pad_to = kernels.shape[-1]
    out = images.clone()
    for size in sorted(set(sizes) - {1}):  # size 1: a pulse
        index = [i for i, s in enumerate(sizes) if s == size]
        inner = slice((pad_to - size) // 2, (pad_to + size) // 2)
        chosen = torch.tensor(index, device=images.device)
        out[chosen] = kornia.filters.filter2d(images[chosen], kernels[index, inner, inner], border_type="reflect")
    return out


def gaussian_kernel_1d(size: int, sigma: float = 0.0) -> torch.Tensor:
    """OpenCV's getGaussianKernel for sizes > 7 (sigma <= 0 derives sigma from the size), float64."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    return kernel / kernel.sum()


def reflect_filter_matrix(length: int, taps: torch.Tensor) -> torch.Tensor:
    """(length, length) M with x @ M = x filtered along its last axis by the odd 1-D `taps`, reflect-padded."""
    radius = taps.shape[-1] // 2
    outputs = torch.arange(length)[:, None]
    inputs = outputs + torch.arange(-radius, radius + 1)[None]
    inputs = torch.where(inputs < 0, -inputs, inputs)
    inputs = torch.where(inputs >= length, 2 * (length - 1) - inputs, inputs)
    matrix = torch.zeros(length, length, dtype=taps.dtype)
    matrix.index_put_((inputs.flatten(), outputs.expand_as(inputs).flatten()), taps.expand(length, -1).flatten(),
                      accumulate=True)
    return matrix


def usm_sharpen(images: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking as BasicSR's USMSharp (cv2's Gaussian of size radius (made odd), sigma from the size).

    The Gaussian is separable and large (51 taps); applied as two matrix products (rows, then columns)
    it runs several times faster on the CPU than a 51x51 or two 1x51 convolutions, with the same result.
    """
    size = radius + 1 if radius % 2 == 0 else radius
    taps = gaussian_kernel_1d(size)
    height, width = images.shape[-2:]
    across = reflect_filter_matrix(width, taps).to(images)
    down = reflect_filter_matrix(height, taps).T.contiguous().to(images)

    def blur(x):
        return down @ (x @ across)

    residual = images - blur(images)
    mask = (residual.abs() * 255 > threshold).to(images.dtype)
    soft_mask = blur(mask)
    sharp = torch.clamp(images + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images
