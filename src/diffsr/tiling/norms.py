"""GroupNorm with given statistics, for the tiled VAE runners: a GroupNorm applied to one band or tile of a
feature map must normalise with statistics of more than that band or tile. Which statistics each GroupNorm
uses is passed to the runners as a `StatisticsOf` function (the module and its input -> mean and variance)."""

from __future__ import annotations

from typing import Callable

import torch

Statistics = tuple[torch.Tensor, torch.Tensor]  # mean and variance per (batch, group), float32
StatisticsOf = Callable[[torch.nn.GroupNorm, torch.Tensor], Statistics]


def map_statistics(x: torch.Tensor, groups: int, rows: int) -> Statistics:
    """Mean and variance per (batch, group) over the whole map, merged band by band (Chan et al.)."""
    count, mean, m2 = 0, 0.0, 0.0
    for top in range(0, x.shape[2], rows):
        band = x[:, :, top:top + rows].float().reshape(x.shape[0], groups, -1)
        n = band.shape[-1]
        band_mean = band.mean(-1)
        band_m2 = ((band - band_mean[..., None]) ** 2).sum(-1)
        delta = band_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + band_m2 + delta * delta * (count * n / total)
        count = total
    return mean, m2 / count


def group_sums(x: torch.Tensor, groups: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, sum, sum of squares) per (batch, group) in float32, one group at a time so that no
    float32 copy of the whole (possibly half-precision) map is made."""
    per_group = x.shape[1] // groups
    sums, squares = [], []
    for group in range(groups):
        part = x[:, group * per_group:(group + 1) * per_group].float().flatten(1)
        sums.append(part.sum(1))
        squares.append((part * part).sum(1))
    return x[0, :per_group].numel(), torch.stack(sums, 1), torch.stack(squares, 1)


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, statistics: Statistics) -> torch.Tensor:
    """GroupNorm `norm` (its groups, eps and affine parameters) of `x` with the given statistics; x may be a
    band of the map they were measured on. Folded into one scale and shift per channel, so the only full-size
    tensor made is the output."""
    mean, var = statistics
    per_group = x.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, 1)  # (batch, channels)
    shift = -mean.repeat_interleave(per_group, 1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
    channel = x.shape[:2] + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(channel).to(x.dtype), x, scale.view(channel).to(x.dtype))


class StatisticsRecord:
    """A `StatisticsOf` that gives every input its own statistics and adds its counts, sums and sums of
    squares to a per-GroupNorm total; `pooled()` turns the totals into mean and variance."""

    def __init__(self):
        self.sums: dict[torch.nn.GroupNorm, tuple] = {}

    def __call__(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> Statistics:
        count, total, squares = group_sums(x, norm.num_groups)
        before = self.sums.get(norm, (0, 0.0, 0.0))
        self.sums[norm] = (before[0] + count, before[1] + total, before[2] + squares)
        return _mean_var(count, total, squares)

    def pooled(self) -> dict[torch.nn.GroupNorm, Statistics]:
        return {norm: _mean_var(*sums) for norm, sums in self.sums.items()}


def given_statistics(statistics: dict[torch.nn.GroupNorm, Statistics]) -> StatisticsOf:
    """A `StatisticsOf` that gives each GroupNorm its entry in `statistics`, whatever its input."""
    return lambda norm, x: statistics[norm]


def _mean_var(count: int, total: torch.Tensor, squares: torch.Tensor) -> Statistics:
    mean = total / count
    return mean, (squares / count - mean * mean).clamp_min(0)
