"""Latent aggregation (StableSR sec. 3.3, Algorithm 1): the latent is split into overlapping tiles snapped to the
right and bottom edges; the method's denoiser runs on batches of tiles; the outputs are merged with Gaussian
weights as sum(w * pred) / sum(w). The sampler then takes one step on the whole latent, so aggregation happens
at every step. A method supplies only `denoise(latent_tiles, condition_tiles) -> prediction_tiles`."""

from __future__ import annotations

import math
from typing import Callable

import torch

from diffsr.progress import Progress

GAUSSIAN_VAR = 0.01  # the papers' weight: sigma = 0.1 * tile
DEFAULT_OVERLAP = 32  # latent px

Denoiser = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: every `tile - overlap`, the last one snapped to end exactly at `size`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def gaussian_weights(height: int, width: int, release: bool = False) -> torch.Tensor:
    """(height, width) weights exp(-d^2 / (2 * 0.01)) with d the offset from the centre in tile units.

    Centred at ((W-1)/2, (H-1)/2); `release=True` centres y at H/2 as the released code does."""

    def profile(n: int, centre: float) -> torch.Tensor:
        offset = (torch.arange(n, dtype=torch.float64) - centre) / n
        return torch.exp(-offset * offset / (2 * GAUSSIAN_VAR))

    y = profile(height, height / 2 if release else (height - 1) / 2)
    x = profile(width, (width - 1) / 2)
    return (y[:, None] * x[None, :]).float()




def aggregate(denoise: Denoiser, latent: torch.Tensor, condition: torch.Tensor | None, tile: int,
              overlap: int = DEFAULT_OVERLAP, tile_batch: int = 1, release_gaussian: bool = False,
              progress: Progress | None = None) -> torch.Tensor:
    """Run `denoise` over overlapping tiles of `latent` (and the matching tiles of `condition`) and merge.

    `denoise(latents, conditions)` gets up to `tile_batch` tiles stacked along the batch axis (each tile
    contributes latent.shape[0] rows, in tile order) and returns predictions of the same spatial size.
    `condition` is a tensor with the latent's height and width (e.g. the LR latent), or None. When the latent
    is no larger than one tile in area (the releases' rule: such a pass needs no more memory than a tile),
    `denoise` runs once on the whole latent and its output is returned unchanged.
    `release_gaussian` reproduces the released code: its off-centre weights and square tiles of the short side.
    `progress` hears of the pass (its number of batches) and of each batch done."""
    progress = progress or Progress()
    height, width = latent.shape[-2:]
    if height * width <= tile * tile:
        progress.start("denoise", 1)
        merged = denoise(latent, condition)
        progress.advance("denoise")
        return merged
    if condition is not None and condition.shape[-2:] != latent.shape[-2:]:
        raise ValueError(f"condition {tuple(condition.shape)} does not match latent {tuple(latent.shape)} in size")
    tile_h, tile_w = min(tile, height), min(tile, width)
    if release_gaussian:
        tile_h = tile_w = min(tile_h, tile_w)
        overlap = min(overlap, tile_h // 2)  # square tiles cut down to a thin latent must still move forward
    boxes = [(y, x) for y in tile_starts(height, tile_h, overlap) for x in tile_starts(width, tile_w, overlap)]
    weight = gaussian_weights(tile_h, tile_w, release_gaussian).to(latent.device)
    merged = weight_sum = None
    progress.start("denoise", math.ceil(len(boxes) / tile_batch))
    for first in range(0, len(boxes), tile_batch):
        group = boxes[first:first + tile_batch]
        tiles = torch.cat([latent[..., y:y + tile_h, x:x + tile_w] for y, x in group])
        conditions = None if condition is None else torch.cat(
            [condition[..., y:y + tile_h, x:x + tile_w] for y, x in group])
        predictions = denoise(tiles, conditions).float().chunk(len(group))
        if merged is None:
            merged = latent.new_zeros((latent.shape[0], predictions[0].shape[1], height, width), dtype=torch.float32)
            weight_sum = latent.new_zeros((height, width), dtype=torch.float32)
        for (y, x), prediction in zip(group, predictions):
            merged[..., y:y + tile_h, x:x + tile_w] += prediction * weight
            weight_sum[y:y + tile_h, x:x + tile_w] += weight
        progress.advance("denoise")
    return (merged / weight_sum).to(latent.dtype)
