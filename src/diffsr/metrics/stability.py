"""Stability over N runs with different seeds (CCSR paper, eqs. 4-5), for any method.

G-STD: for each image, the standard deviation over the N runs of a metric (PSNR, LPIPS, ...), averaged
over images. L-STD: for each image, the per-pixel standard deviation over the N runs of the RGB values
in [0, 1], averaged over pixels and channels, then over images. As the release's scripts
(cal_iqa/iqa_G-STD.py, iqa_L-STD.py): population std (numpy's default) and, for L-STD, a 4-pixel
border cropped off each image. The paper uses N = 10.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from diffsr.errors import UsageError

CROP_BORDER = 4


def _unit(image) -> np.ndarray:
    """HxWx3 uint8/uint16 or float in [0, 1] (array or [0, 1] CHW/HWC tensor) -> float64 HxWx3 in [0, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
        if image.ndim == 4:
            image = image[0]
        if image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.transpose(1, 2, 0)
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535
    return image.astype(np.float64)


def _runs_by_image(runs: Sequence[Sequence]) -> list[list]:
    """runs[run][image] -> per image, its N runs; checks the layout."""
    if len(runs) < 2:
        raise UsageError(f"stability needs at least 2 runs, got {len(runs)}")
    counts = {len(run) for run in runs}
    if len(counts) != 1 or 0 in counts:
        raise UsageError(f"every run must hold the same, non-zero number of images, got {sorted(len(r) for r in runs)}")
    return [[run[i] for run in runs] for i in range(counts.pop())]


def g_std(values) -> float:
    """values[run][image] of one metric -> mean over images of the std over runs (eq. 4)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 2:
        raise UsageError(f"G-STD needs values shaped (runs, images) with at least 2 runs, got shape {values.shape}")
    return float(values.std(axis=0).mean())


def metric_g_std(metric: Callable, runs: Sequence[Sequence], references: Sequence | None = None) -> float:
    """G-STD of `metric` over runs[run][image]: metric(output, reference) with references, or metric(output)
    for no-reference metrics."""
    per_image = _runs_by_image(runs)
    if references is not None and len(references) != len(per_image):
        raise UsageError(f"{len(references)} references for {len(per_image)} images")
    values = [[float(metric(out) if references is None else metric(out, references[i])) for out in outputs]
              for i, outputs in enumerate(per_image)]
    return g_std(np.asarray(values).T)


def pixel_std(outputs: Sequence, crop_border: int = CROP_BORDER) -> float:
    """The N outputs for one input -> mean over pixels and channels of the per-pixel std over runs."""
    stack = np.stack([_unit(image) for image in outputs])
    if stack.shape[0] < 2:
        raise UsageError("L-STD needs at least 2 runs")
    if crop_border:
        stack = stack[:, crop_border:-crop_border, crop_border:-crop_border]
    if stack.size == 0:
        raise UsageError(f"images of shape {stack.shape[1:]} are too small for a {crop_border}-pixel border crop")
    return float(stack.std(axis=0).mean())


def l_std(runs: Sequence[Sequence], crop_border: int = CROP_BORDER) -> float:
    """runs[run][image] (arrays or tensors, see _unit) -> L-STD of the set (eq. 5)."""
    return float(np.mean([pixel_std(outputs, crop_border) for outputs in _runs_by_image(runs)]))


def upscale_runs(upscaler, images: Sequence, seeds: Iterable[int] = range(10), scale: float = 4,
                 **knobs) -> list[list[np.ndarray]]:
    """Upscale every image once per seed: outputs[run][image] as HxWx3 arrays, ready for l_std/metric_g_std."""
    return [[upscaler.upscale(image, scale=scale, seed=seed, **knobs).rgb for image in images] for seed in seeds]
