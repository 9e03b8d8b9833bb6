"""Colour correction shared by all methods: match the result's colours to the (upscaled) input.

All four releases ship the same two fixes; inputs and outputs are (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")
WAVELET_LEVELS = 5
WAVELET_REACH = 2**WAVELET_LEVELS - 1  # rows the five dilated blurs (radii 1..16) reach
WAVELET_ROWS = 256  # rows per band of the wavelet fix


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    # Unbiased variance + eps, as in the releases.
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]


def adain(result: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give `result` the per-channel mean and std of `source` (the releases' operations, one image-sized
    temporary: the rest runs in place)."""
    source_mean, source_std = _mean_std(source)
    result_mean, result_std = _mean_std(result)
    return (result - result_mean).div_(result_std).mul_(source_std).add_(source_mean).clamp_(0, 1)


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel[None, None].repeat(x.shape[1], 1, 1, 1)
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(x, kernel, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): high is the sum of the detail bands at radii 1, 2, 4, 8, 16; low is what remains."""
    high = torch.zeros_like(x)
    for level in range(levels):
        low = _wavelet_blur(x, 2**level)
        high += x - low
        x = low
    return high, x


def wavelet(result: torch.Tensor, source: torch.Tensor, rows: int = WAVELET_ROWS) -> torch.Tensor:
    """Keep the result's detail bands and take the source's low-frequency colours.

    Computed in bands of `rows` rows with WAVELET_REACH rows of context on each side: the blurs reach that far
    (1 + 2 + 4 + 8 + 16 px), so the replicate padding at a band's inner edge only touches the context rows
    and every kept row is what the whole-image computation gives, without its many image-sized temporaries."""
    height = result.shape[-2]
    out = torch.empty_like(result)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        start, stop = max(top - WAVELET_REACH, 0), min(bottom + WAVELET_REACH, height)
        high = _wavelet_split(result[..., start:stop, :])[0]
        high += _wavelet_split(source[..., start:stop, :])[1]
        out[..., top:bottom, :] = high[..., top - start:bottom - start, :].clamp_(0, 1)
    return out


def color_fix(result: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    if method == "adain":
        return adain(result, source)
    if method == "wavelet":
        return wavelet(result, source)
    if method == "none":
        return result
    raise ValueError(f"unknown color fix '{method}' (choose {', '.join(COLOR_FIXES)})")
