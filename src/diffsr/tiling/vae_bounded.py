"""Bounded tiled VAE: each tile (with a halo of context) runs through the whole network on its own, twice:
first with its own GroupNorm statistics, which are pooled over all tiles, then with the pooled statistics,
shared by all tiles (so no brightness jumps); attention stays within the tile. Memory stops growing at the tile
size; the result approximates the untiled one."""

from __future__ import annotations

import math

import torch

from diffsr.progress import Progress
from diffsr.tiling.norms import Statistics, StatisticsRecord, given_statistics
from diffsr.tiling.vae_exact import Callback, Region, VaeRunner


def tile_boxes(size: int, tile: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split [0, size) into the fewest equal-as-possible parts no longer than `tile`, cut at multiples of
    `unit` (8 for the encoder's input: each part must map onto whole latent pixels)."""
    count = math.ceil(size / tile)
    edges = [round(i * size / unit / count) * unit for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def run_bounded(net, x: torch.Tensor, tile: int, halo: int, scale: float, unit: int = 1,
                callbacks: dict[torch.nn.Module, Callback] | None = None,
                statistics: dict[torch.nn.Module, Statistics] | None = None, progress: Progress | None = None,
                phase: str = "decode") -> torch.Tensor:
    """Each core tile of `x` (tile x tile, plus `halo` of context) through `net`; outputs `scale` x the input.

    Two passes: the first runs every tile with its own GroupNorm statistics and pools them over all tiles;
    the second normalises every tile with the pooled statistics, so all tiles share one brightness.
    `callbacks` (see VaeRunner) get the tile's Region: its box and the statistics any GroupNorm they run
    must use, so that theirs are pooled too. `statistics`, if given, receives the pooled statistics. Each tile
    run is one unit of `phase` in `progress`, the total (tiles x passes) announced before the first."""
    height, width = x.shape[-2:]
    boxes = []
    for top, bottom in tile_boxes(height, tile, unit):
        for left, right in tile_boxes(width, tile, unit):
            padded = (max(top - halo, 0), min(bottom + halo, height), max(left - halo, 0), min(right + halo, width))
            boxes.append(((top, bottom, left, right), padded))

    progress = progress or Progress()
    progress.start(phase, 2 * len(boxes))

    def run(padded, statistics_of):
        y0, y1, x0, x1 = padded
        result = VaeRunner(net, statistics=statistics_of, callbacks=callbacks, region=Region(padded, statistics_of))(
            x[..., y0:y1, x0:x1])
        progress.advance(phase)
        return result

    record = StatisticsRecord()
    for _, padded in boxes:  # with halos: statistics of halo-less tiles came out 2-3x worse
        run(padded, record)
    pooled = record.pooled()
    if statistics is not None:
        statistics.update(pooled)
    out = None
    for (top, bottom, left, right), padded in boxes:
        y0, x0 = padded[0], padded[2]
        result = run(padded, given_statistics(pooled))
        core = result[..., round((top - y0) * scale):round((bottom - y0) * scale),
                      round((left - x0) * scale):round((right - x0) * scale)]
        if out is None:
            out = x.new_empty((x.shape[0], core.shape[1], round(height * scale), round(width * scale)),
                              dtype=core.dtype)
        out[..., round(top * scale):round(bottom * scale), round(left * scale):round(right * scale)] = core
    return out
