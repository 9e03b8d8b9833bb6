"""GroupNorm with given statistics, and the statistics themselves, for the tiled VAE runners: a GroupNorm
applied to one band or tile of a feature map must use statistics of more than that band or tile."""

from __future__ import annotations

import torch


def map_statistics(x: torch.Tensor, groups: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, stats) -> torch.Tensor:
    """GroupNorm of `x` with the given statistics; x may be a band of the map they were measured on.
    Folded into one scale and shift per channel, so the only full-size tensor made is the output."""
    mean, var = stats
    per_group = x.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, 1)  # (batch, channels)
    shift = -mean.repeat_interleave(per_group, 1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
    channel = x.shape[:2] + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(channel).to(x.dtype), x, scale.view(channel).to(x.dtype))

