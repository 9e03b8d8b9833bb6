"""Bounded tiled VAE: each tile (with a halo of context) runs through the whole network on its own, with
GroupNorm statistics shared by all tiles (so no brightness jumps); attention stays within the tile. The shared
statistics come from a first pass, each box run with its own statistics, pooled: over every tile, or over a
sample of tile-sized boxes spread over the image (`sample_spans`). Memory stops growing at the tile size; the
result approximates the untiled one."""

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


def sample_spans(size: int, tile: int, unit: int = 1) -> list[tuple[int, int]]:
    """The statistics pass's spans along one side: half as many as the tiles (rounded up), each a whole tile
    long, spread evenly from one end to the other (the ends matter: the zero padding there shapes the untiled
    statistics; one span is centred). About a quarter of the area of a large image, all of a one-tile one.
    Measured on the full-size SD VAE decoder (random weights) and the test VAE: the output is as close to the
    untiled one as with statistics from every tile; not on the encoder, whose output moved 2.5x further, so
    the encoder takes every tile (benchmarks/results/bounded_vae_cost.md)."""
    count = math.ceil(size / tile / 2)
    length = min(tile, size)
    starts = [(size - length) / 2] if count == 1 else [k * (size - length) / (count - 1) for k in range(count)]
    return [(start, start + length) for start in (int(s // unit) * unit for s in starts)]


def run_bounded(net, x: torch.Tensor, tile: int, halo: int, scale: float, unit: int = 1, sampled: bool = True,
                callbacks: dict[torch.nn.Module, Callback] | None = None,
                statistics: dict[torch.nn.Module, Statistics] | None = None, progress: Progress | None = None,
                phase: str = "decode") -> torch.Tensor:
    """Each core tile of `x` (tile x tile, plus `halo` of context) through `net`; outputs `scale` x the input.

    Two passes: the first runs a sample of tile-sized boxes (`sample_spans`; every tile where not `sampled`)
    with their own GroupNorm statistics and pools them; the second runs every tile normalised with the pooled
    statistics, so all tiles share one brightness.
    `callbacks` (see VaeRunner) get the tile's Region: its box and the statistics any GroupNorm they run
    must use, so that theirs are pooled too. `statistics`, if given, receives the pooled statistics. Each tile
    run is one unit of `phase` in `progress`, the total (sample boxes + tiles) announced before the first."""
    height, width = x.shape[-2:]

    def with_halo(top, bottom, left, right):
        return max(top - halo, 0), min(bottom + halo, height), max(left - halo, 0), min(right + halo, width)

    def grid(spans):
        return [(top, bottom, left, right) for top, bottom in spans(height, tile, unit)
                for left, right in spans(width, tile, unit)]

    boxes = [(core, with_halo(*core)) for core in grid(tile_boxes)]
    # with halos: statistics of halo-less tiles came out 2-3x worse
    sample = [with_halo(*box) for box in grid(sample_spans if sampled else tile_boxes)]

    progress = progress or Progress()
    progress.start(phase, len(sample) + len(boxes))

    def run(padded, statistics_of):
        y0, y1, x0, x1 = padded
        result = VaeRunner(net, statistics=statistics_of, callbacks=callbacks, region=Region(padded, statistics_of))(
            x[..., y0:y1, x0:x1])
        progress.advance(phase)
        return result

    record = StatisticsRecord()
    for padded in sample:
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
