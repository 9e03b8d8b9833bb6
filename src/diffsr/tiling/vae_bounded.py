"""Bounded tiled VAE: each tile (with a halo of context) runs through the whole network on its own, twice:
first with its own GroupNorm statistics, which are pooled over all tiles, then with the pooled statistics,
shared by all tiles (so no brightness jumps); attention stays within the tile. Memory stops growing at the tile
size; the result approximates the untiled one."""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from diffsr.tiling.norms import group_norm, group_sums

_TILE: ContextVar[tuple[int, int, int, int] | None] = ContextVar("diffsr_bounded_tile", default=None)


def bounded_tile() -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the input that the current bounded-mode tile covers, halo included;
    None outside bounded mode (the whole input)."""
    return _TILE.get()


@contextmanager
def shared_statistics(net: torch.nn.Module, statistics: dict):
    """While active, every GroupNorm of `net` normalises with the given pooled statistics (from `vae_encode`'s
    `statistics`), so any crop of the input runs as it did inside the whole bounded run."""
    with _group_norm_statistics([net], use=statistics):
        yield


@contextmanager
def _group_norm_statistics(nets, record: dict | None = None, use: dict | None = None):
    """While active, every GroupNorm in `nets` either adds its input's per-group count, sum and sum of squares
    to `record` (and normalises with its own statistics), or normalises with the pooled statistics in `use`."""
    norms = [m for net in nets for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]

    def forward(norm, x):
        if use is not None:
            return group_norm(x, norm, use[norm])
        count, total, squares = group_sums(x, norm.num_groups)
        before = record.get(norm, (0, 0.0, 0.0))
        record[norm] = (before[0] + count, before[1] + total, before[2] + squares)
        mean = total / count
        return group_norm(x, norm, (mean, (squares / count - mean * mean).clamp_min(0)))

    for norm in norms:
        norm.forward = lambda x, norm=norm: forward(norm, x)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def _pooled(record: dict) -> dict:
    """Mean and variance per GroupNorm from the summed counts, sums and sums of squares."""
    pooled = {}
    for norm, (count, total, squares) in record.items():
        mean = total / count
        pooled[norm] = (mean, (squares / count - mean * mean).clamp_min(0))
    return pooled


def tile_boxes(size: int, tile: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split [0, size) into the fewest equal-as-possible parts no longer than `tile`, cut at multiples of
    `unit` (8 for the encoder's input: each part must map onto whole latent pixels)."""
    count = math.ceil(size / tile)
    edges = [round(i * size / unit / count) * unit for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def run_bounded(net, x: torch.Tensor, tile: int, halo: int, scale: float, unit: int = 1,
                 hooked: tuple[torch.nn.Module, ...] = (), statistics: dict | None = None) -> torch.Tensor:
    """Each core tile of `x` (tile x tile, plus `halo` of context) through `net`; outputs `scale` x the input.

    Two passes: the first runs every tile with its own GroupNorm statistics and pools them over all tiles;
    the second normalises every tile with the pooled statistics, so all tiles share one brightness. The
    GroupNorms of `hooked` modules take part too; `statistics`, if given, receives the pooled statistics."""
    height, width = x.shape[-2:]
    boxes = []
    for top, bottom in tile_boxes(height, tile, unit):
        for left, right in tile_boxes(width, tile, unit):
            padded = (max(top - halo, 0), min(bottom + halo, height), max(left - halo, 0), min(right + halo, width))
            boxes.append(((top, bottom, left, right), padded))

    def run(padded):
        y0, y1, x0, x1 = padded
        token = _TILE.set(padded)
        try:
            return net(x[..., y0:y1, x0:x1])
        finally:
            _TILE.reset(token)

    record: dict = {}
    with _group_norm_statistics([net, *hooked], record=record):
        for _, padded in boxes:  # with halos: statistics of halo-less tiles came out 2-3x worse
            run(padded)
    pooled = _pooled(record)
    if statistics is not None:
        statistics.update(pooled)
    out = None
    with _group_norm_statistics([net, *hooked], use=pooled):
        for (top, bottom, left, right), padded in boxes:
            y0, x0 = padded[0], padded[2]
            result = run(padded)
            core = result[..., round((top - y0) * scale):round((bottom - y0) * scale),
                          round((left - x0) * scale):round((right - x0) * scale)]
            if out is None:
                out = x.new_empty((x.shape[0], core.shape[1], round(height * scale), round(width * scale)),
                                  dtype=core.dtype)
            out[..., round(top * scale):round(bottom * scale), round(left * scale):round(right * scale)] = core
    return out
