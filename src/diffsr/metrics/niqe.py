"""NIQE (Mittal et al. 2013), computed as pyiqa's `niqe` does.

The pristine model (mean and covariance of 36 natural-scene features over a corpus of pristine
images) ships as data: `data/niqe_pristine.npz`, the parameters of the original MATLAB release
(`modelparameters.mat`, LIVE lab), as redistributed by BasicSR (Apache-2.0) and pyiqa.

Per image: Y channel (pyiqa uses YIQ luma for NIQE) rounded to 8 bits; cropped to whole 96x96 blocks;
at two scales (full, then MATLAB-bicubic half size) each block's MSCN coefficients give 18 features
(AGGD fits of the coefficients and of their four neighbour products); the score is the Mahalanobis-like
distance between the blocks' Gaussian fit and the pristine one. Written here because pyiqa needs
torchvision; float64 throughout except the half-size resize, which pyiqa runs in float32.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from diffsr.metrics.fidelity import luma

BLOCK = 96


@lru_cache(maxsize=1)
def pristine_model() -> tuple[torch.Tensor, torch.Tensor]:
    with resources.as_file(resources.files("diffsr.metrics") / "data" / "niqe_pristine.npz") as path:
        data = np.load(path)
        return torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["cov"]).double()


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """MATLAB's fspecial('gaussian'), rounded to float32 as pyiqa stores it."""
    half = (size - 1) / 2
    coords = np.arange(-half, half + 1)
    window = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma * sigma))
    window[window < np.finfo(window.dtype).eps * window.max()] = 0
    return torch.from_numpy(window / window.sum()).float()


def _gamma_table(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate AGGD shapes 0.2..10 step 0.001 (generated in float32, as the reference does) and their ratios."""
    shapes = torch.arange(0.2, 10 + 0.001, 0.001).double().to(device)
    ratios = (2 * torch.lgamma(2 / shapes) - torch.lgamma(1 / shapes) - torch.lgamma(3 / shapes)).exp()
    return shapes, ratios


def aggd_fit(x: torch.Tensor, table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric generalized Gaussian fit per block of x (B, 1, h, w): shape alpha, left/right scales."""
    shapes, ratios = table
    left, right = x < 0, x > 0
    left_std = ((x * left) ** 2).sum(dim=(-1, -2)).div(left.sum(dim=(-1, -2), dtype=torch.float32)).sqrt()
    right_std = ((x * right) ** 2).sum(dim=(-1, -2)).div(right.sum(dim=(-1, -2), dtype=torch.float32)).sqrt()
    gamma_hat = left_std / right_std
    r_hat = x.abs().mean(dim=(-1, -2)) ** 2 / (x**2).mean(dim=(-1, -2))
    r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = shapes[(ratios[None] - r_hat_norm).abs().argmin(dim=-1)]
    factor = (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)).exp().sqrt()
    return alpha, left_std[:, 0] * factor, right_std[:, 0] * factor


def block_features(blocks: torch.Tensor, table) -> torch.Tensor:
    """18 NIQE features per block (B, 1, h, w) of MSCN coefficients."""
    alpha, beta_left, beta_right = aggd_fit(blocks, table)
    features = [alpha, (beta_left + beta_right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):  # horizontal, vertical, two diagonals (wrapping in the block)
        alpha, beta_left, beta_right = aggd_fit(blocks * torch.roll(blocks, shift, dims=(2, 3)), table)
        mean = (beta_right - beta_left) * (torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha)).exp()
        features += [alpha, mean, beta_left, beta_right]
    return torch.stack(features, dim=1)


def mscn(image: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted contrast-normalised coefficients with a 7x7 Gaussian (sigma 7/6), replicate padding."""
    window = gaussian_window(7, 7 / 6).to(image)[None, None]
    padded = F.pad(image, (3, 3, 3, 3), mode="replicate")
    mu = F.conv2d(padded, window)
    second = F.conv2d(padded**2, window)
    sigma = ((second - mu**2).abs() + torch.finfo(image.dtype).eps).sqrt()
    return (image - mu) / (sigma + 1)


def _resize_taps(size_in: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights, both (taps, size_out), of MATLAB's antialiased bicubic imresize along one axis.

    Computed in float32 in the same order as pyiqa's port, because NIQE's shape estimate picks the nearest
    of a 0.001-step table and a last-bit difference here can move a block to the neighbouring entry.
    """
    size_out = math.ceil(size_in * scale)
    taps = math.ceil(4 / scale) + 2  # the kernel widened by 1/scale (antialiasing), plus a margin each side
    centre = (torch.linspace(0, size_out - 1, size_out) + 0.5) / scale - 0.5
    first = centre.floor() - taps // 2 + 1
    distance = (centre - first)[None, :] - torch.arange(taps, dtype=torch.float32)[:, None]
    x = (distance * scale).abs()
    x2, x3 = x * x, x * x * x
    near = (1.5 * x3 - 2.5 * x2 + 1) * (x <= 1).float()
    far = ((-0.5 * x3) - (-2.5 * x2) + (-4.0 * x) - (-2.0)) * ((x > 1) & (x <= 2)).float()
    weights = near + far
    weights = weights / weights.sum(dim=0, keepdim=True)
    index = first.long()[None, :] + torch.arange(taps)[:, None]
    index = torch.where(index < 0, -index - 1, index)  # symmetric edges: a a b c ... d d
    index = torch.where(index >= size_in, 2 * size_in - 1 - index, index)
    return index, weights


def matlab_half_size(image: torch.Tensor) -> torch.Tensor:
    """MATLAB imresize(image, 0.5) (bicubic, antialiased) of (N, 1, H, W), in float32 like pyiqa's port,
    accumulated tap by tap in the same order."""
    dtype, image = image.dtype, image.float()
    index, weights = (t.to(image.device) for t in _resize_taps(image.shape[-2], 0.5))
    rows = sum(image[:, :, index[t], :] * weights[t][:, None] for t in range(len(index)))
    index, weights = (t.to(image.device) for t in _resize_taps(image.shape[-1], 0.5))
    return sum(rows[:, :, :, index[t]] * weights[t] for t in range(len(index))).to(dtype)


def niqe(rgb: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """NIQE per image of (N, 3, H, W) tensors in [0, 1] (lower is better)."""
    image = (luma(rgb, "yiq") * 255).round().double()
    if crop_border:
        image = image[..., crop_border:-crop_border, crop_border:-crop_border]
    rows, cols = image.shape[-2] // BLOCK, image.shape[-1] // BLOCK
    if rows == 0 or cols == 0:
        raise ValueError(f"NIQE needs images of at least {BLOCK}x{BLOCK} pixels, got {image.shape[-1]}x{image.shape[-2]}")
    image = image[..., : rows * BLOCK, : cols * BLOCK]
    table = _gamma_table(image.device)
    batch = image.shape[0]
    per_scale = []
    for scale in (1, 2):
        size = BLOCK // scale
        coefficients = mscn(image)
        blocks = coefficients.unfold(2, size, size).unfold(3, size, size)  # (N, 1, rows, cols, size, size)
        blocks = blocks.permute(0, 3, 2, 1, 4, 5).reshape(-1, 1, size, size)  # column-major block order
        per_scale.append(block_features(blocks, table).reshape(batch, rows * cols, 18))
        if scale == 1:
            image = matlab_half_size(image / 255) * 255
    features = torch.cat(per_scale, dim=-1)
    mu_pristine, cov_pristine = pristine_model()
    scores = []
    for feats in features:
        mu = torch.nanmean(feats, dim=0)  # NaN features (e.g. a block with no negative coefficient) are skipped
        rows = feats[~torch.isnan(feats).any(dim=1)]
        cov = torch.cov(rows.T, correction=1 if len(rows) > 1 else 0)  # one block: zero covariance, as pyiqa
        diff = (mu_pristine.to(mu) - mu)[None]
        inverse = torch.linalg.pinv((cov_pristine.to(cov) + cov) / 2)
        scores.append((diff @ inverse @ diff.T).squeeze().sqrt())
    return torch.stack(scores)
