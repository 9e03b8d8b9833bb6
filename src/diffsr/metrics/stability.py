"""CCSR's stability measures over N runs of a method with different seeds (CCSR paper, eqs. 4-5).

G-STD of a metric: for each image the standard deviation of the metric over the N runs (population
std, divide by N), averaged over images. L-STD: for each image and pixel the standard deviation over
the N runs of the pixel value in [0, 1], averaged over pixels, channels and images. Any method's outputs
can be measured: they are plain images from runs with different seeds.
"""

from __future__ import annotations

import numpy as np


def g_std(values) -> float:
    """values: (runs, images) of one metric -> mean over images of the std over runs."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"G-STD needs a (runs, images) array with at least 2 runs, got shape {values.shape}")
    return float(values.std(axis=0).mean())


def pixel_std(runs) -> float:
    """runs: N images of one input (H, W, 3) uint8/uint16 or float in [0, 1] -> mean per-pixel std over runs."""
    stack = np.stack([_unit(image) for image in runs])
    if stack.shape[0] < 2:
        raise ValueError("L-STD needs at least 2 runs")
    return float(stack.std(axis=0).mean())


def l_std(runs_per_image) -> float:
    """runs_per_image: for each image, its N runs (see pixel_std) -> L-STD of the set."""
    values = [pixel_std(runs) for runs in runs_per_image]
    if not values:
        raise ValueError("L-STD needs at least one image")
    return float(np.mean(values))


def _unit(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535
    return image.astype(np.float64)
