"""PSNR and SSIM as the SR papers compute them: on the Y channel, with pyiqa's conventions.

The papers call pyiqa with `test_y_channel=True, color_space='ycbcr'`: Y = (65.481 R + 128.553 G +
24.966 B + 16) / 255 on [0, 1] RGB (ITU-R BT.601). PSNR uses that Y as is (data range 1); SSIM rounds
it to 8-bit levels first, as MATLAB's ssim on uint8 images did, and uses the 11x11 Gaussian window
(sigma 1.5) over the valid region with negative contrast-structure terms clipped to zero.
Written here (not torchmetrics/kornia) because neither rounds Y nor clips the cs term, and their
numbers would then differ from the papers' tables.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Y_WEIGHTS = {"ycbcr": (65.481 / 255, 128.553 / 255, 24.966 / 255), "yiq": (0.299, 0.587, 0.114)}


def luma(rgb: torch.Tensor, color_space: str = "ycbcr") -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H, W) luma in [0, 1] (float32, as pyiqa computes it)."""
    if color_space not in Y_WEIGHTS:
        raise ValueError(f"unknown color space {color_space!r} (choose {', '.join(Y_WEIGHTS)})")
    rgb = rgb.float()
    if color_space == "ycbcr":  # pyiqa's order of operations: weights in 0-255 units, then / 255
        weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float32, device=rgb.device)
        return ((rgb.permute(0, 2, 3, 1) @ weights + 16) / 255)[:, None]
    weights = torch.tensor(Y_WEIGHTS[color_space], dtype=torch.float32, device=rgb.device)
    return (rgb.permute(0, 2, 3, 1) @ weights)[:, None]


def crop(image: torch.Tensor, border: int) -> torch.Tensor:
    return image[..., border:-border, border:-border] if border else image


def psnr(sr: torch.Tensor, gt: torch.Tensor, y_channel: bool = True, color_space: str = "ycbcr",
         crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB per image of (N, 3, H, W) tensors in [0, 1]."""
    sr, gt = crop(sr, crop_border), crop(gt, crop_border)
    if y_channel:
        sr, gt = luma(sr, color_space), luma(gt, color_space)
    mse = ((sr.double() - gt.double()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / (mse + 1e-8))


def ssim(sr: torch.Tensor, gt: torch.Tensor, y_channel: bool = True, color_space: str = "ycbcr",
         crop_border: int = 0) -> torch.Tensor:
    """SSIM per image of (N, 3, H, W) tensors in [0, 1]."""
    sr, gt = crop(sr, crop_border), crop(gt, crop_border)
    if y_channel:
        sr, gt = luma(sr, color_space), luma(gt, color_space)
    x = (sr.float() * 255).round().double()
    y = (gt.float() * 255).round().double()
    size = 11
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {x.shape[-1]}x{x.shape[-2]}")
    # The 11x11 Gaussian is separable, and its 'valid' filtering along one axis is a product with a banded
    # matrix: two matrix products give the sums of the 2-D window (to float64 rounding) far faster than a
    # float64 depthwise convolution on a CPU.
    coords = np.arange(size) - (size - 1) / 2
    line = np.exp(-(coords**2) / (2 * 1.5**2))
    line /= line.sum()

    def band(length):
        matrix = np.zeros((length - size + 1, length))
        for row in range(length - size + 1):
            matrix[row, row:row + size] = line
        return torch.from_numpy(matrix).to(x.device)

    rows, cols = band(x.shape[-2]), band(x.shape[-1])

    def blur(image):
        return rows @ image @ cols.T

    mu_x, mu_y, xx, yy, xy = blur(x), blur(y), blur(x * x), blur(y * y), blur(x * y)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    var_x, var_y, cov_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    contrast_structure = F.relu((2 * cov_xy + c2) / (var_x + var_y + c2))
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))
