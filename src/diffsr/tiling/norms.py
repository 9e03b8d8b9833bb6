"""GroupNorm over row bands, for the tiled VAE runner: a GroupNorm applied to one band of a feature map must
normalise with the statistics of the whole map, measured band by band first."""

from __future__ import annotations

from typing import Iterable

import torch

Statistics = tuple[torch.Tensor, torch.Tensor]  # mean and variance per (batch, group), float32


class RunningStatistics:
    """Mean and variance per (batch, group) of a map given band by band, merged as the bands come (Chan et
    al.), so that a map's statistics can be measured while it is written instead of by reading it again."""

    def __init__(self, groups: int):
        self.groups, self.count, self.mean, self.m2 = groups, 0, 0.0, 0.0

    def add(self, band: torch.Tensor) -> None:
        batch = band.shape[0]
        per_channel = band[0, 0].numel()
        # mean and variance per (batch, channel) by torch's batch-norm statistics kernel (each plane as a
        # channel): two passes over a row band in place, 1.5-4x faster here than reshaping it into groups
        mean, var = torch.batch_norm_update_stats(band.float().flatten(0, 1).unsqueeze(0), None, None, 0.0)
        mean, var = mean.view(batch, self.groups, -1), var.view(batch, self.groups, -1)
        band_mean = mean.mean(-1)
        band_m2 = (var.sum(-1) + (mean - band_mean[..., None]).square().sum(-1)) * per_channel
        n = per_channel * mean.shape[-1]
        delta = band_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + band_m2 + delta * delta * (self.count * n / total)
        self.count = total

    def result(self) -> Statistics:
        return self.mean, self.m2 / self.count


def map_statistics(bands: Iterable[torch.Tensor], groups: int) -> Statistics:
    """Mean and variance per (batch, group) over a whole map given as its row bands."""
    running = RunningStatistics(groups)
    for band in bands:
        running.add(band)
    return running.result()


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
