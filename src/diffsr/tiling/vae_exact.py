"""The VAE runner: a diffusers Encoder/Decoder run block by block, by our own code, so that what each GroupNorm
normalises with and what the callbacks see are passed in rather than patched onto the modules.

Exact tiled mode runs it over row bands of whole feature maps: each GroupNorm pools its statistics over all
bands before normalising and the mid-block attention attends over the whole map, so the result equals the
untiled one up to float error. The feature maps are held whole (on the compute device); only the per-operation
working memory is bounded. The bounded mode (vae_bounded) runs it on one tile at a time, in one band."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from diffsr.tiling.norms import StatisticsOf, group_norm, map_statistics

WHOLE_MAP = 1 << 30  # rows of a band that is always the whole map


@dataclass(frozen=True)
class Region:
    """What a callback's feature map covers: `box` (top, bottom, left, right) of the VAE's input, halo
    included, or None for the whole input; `statistics`: what any GroupNorm the callback runs on that map must
    normalise with (None: its own statistics, as the map is whole)."""

    box: tuple[int, int, int, int] | None = None
    statistics: StatisticsOf | None = None


WHOLE = Region()

# Called with a resnet block's output after the block; a returned tensor replaces the output (StableSR's CFW).
Callback = Callable[[torch.nn.Module, torch.Tensor, Region], "torch.Tensor | None"]


def resnet_block(block: torch.nn.Module, x: torch.Tensor, statistics: StatisticsOf | None = None) -> torch.Tensor:
    """A diffusers ResnetBlock2D without time embedding, its GroupNorms normalising with `statistics`
    (None: the block as it is, its own statistics)."""
    if statistics is None:
        return block(x, None)
    return VaeRunner(block, statistics=statistics).resnet(block, x)


class VaeRunner:
    """Runs a diffusers VAE Encoder or Decoder block by block over row bands of `rows` rows (None: whole maps).

    `statistics`: what each GroupNorm normalises with (None: its input's statistics over the whole map,
    measured band by band). `callbacks`: called after the given resnet blocks with (block, output, region)."""

    def __init__(self, net: torch.nn.Module, rows: int | None = None, statistics: StatisticsOf | None = None,
                 callbacks: dict[torch.nn.Module, Callback] | None = None, region: Region = WHOLE):
        self.net = net
        self.rows = WHOLE_MAP if rows is None else max(rows, 8)
        self.statistics = statistics if statistics is not None else (
            lambda norm, x: map_statistics(x, norm.num_groups, self.rows))
        self.callbacks = callbacks or {}
        self.region = region

    def steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The network as a list of blocks (conv_in, resnets, attention, resamplers, head), each x -> x."""
        net = self.net
        steps = [partial(self._local, net.conv_in)]
        if hasattr(net, "up_blocks"):  # a Decoder
            steps += self._mid_steps(net.mid_block)
            for block in net.up_blocks:
                steps += [partial(self.resnet, resnet) for resnet in block.resnets]
                steps += [partial(self._local, up, halo=1, up=2) for up in block.upsamplers or ()]
        else:
            for block in net.down_blocks:
                steps += [partial(self.resnet, resnet) for resnet in block.resnets]
                steps += [partial(self._downsample, down) for down in block.downsamplers or ()]
            steps += self._mid_steps(net.mid_block)
        return steps + [self._head]

    def __call__(self, x: torch.Tensor, advance: Callable[[], None] = lambda: None) -> torch.Tensor:
        """The network's output for `x`; `advance()` after every block."""
        for step in self.steps():
            x = step(x)
            advance()
        return x

    def _local(self, fn, x: torch.Tensor, halo: int = 1, up: int = 1) -> torch.Tensor:
        """fn applied band by band; fn is local with `halo` rows of context and scales rows by `up`."""
        height = x.shape[2]
        if height <= self.rows:
            return fn(x)
        out = None
        for top in range(0, height, self.rows):
            bottom = min(top + self.rows, height)
            start, stop = max(top - halo, 0), min(bottom + halo, height)
            y = fn(x[:, :, start:stop])
            y = y[:, :, (top - start) * up:(bottom - start) * up]
            if out is None:
                out = x.new_empty((x.shape[0], y.shape[1], height * up, y.shape[3]), dtype=y.dtype)
            out[:, :, top * up:bottom * up] = y
        return out

    def _downsample(self, down, x: torch.Tensor) -> torch.Tensor:
        # Downsample2D pads one zero row/column at the bottom/right, then a 3x3 stride-2 conv.
        height = x.shape[2]
        out_height = (height - 2) // 2 + 1
        band_rows = max(self.rows // 2, 1)
        if out_height <= band_rows:
            return down(x)
        out = None
        for top in range(0, out_height, band_rows):
            bottom = min(top + band_rows, out_height)
            y = down(x[:, :, 2 * top:min(2 * bottom + 1, height)])[:, :, :bottom - top]
            if out is None:
                out = x.new_empty((x.shape[0], y.shape[1], out_height, y.shape[3]), dtype=y.dtype)
            out[:, :, top:bottom] = y
        return out

    def _norm_act(self, norm, act, x):
        statistics = self.statistics(norm, x)
        return lambda band: act(group_norm(band, norm, statistics))

    def resnet(self, block, x: torch.Tensor) -> torch.Tensor:
        if block.time_emb_proj is not None or block.upsample is not None or block.downsample is not None:
            raise NotImplementedError("tiled VAE supports plain resnet blocks only")
        pre1 = self._norm_act(block.norm1, block.nonlinearity, x)
        hidden = self._local(lambda b: block.conv1(pre1(b)), x)
        pre2 = self._norm_act(block.norm2, block.nonlinearity, hidden)
        hidden = self._local(lambda b: block.conv2(block.dropout(pre2(b))), hidden)
        shortcut = x if block.conv_shortcut is None else self._local(block.conv_shortcut, x, halo=0)
        out = (shortcut + hidden) / block.output_scale_factor
        callback = self.callbacks.get(block)
        if callback is not None:
            changed = callback(block, out, self.region)
            out = out if changed is None else changed
        return out

    def _attention(self, attn, x: torch.Tensor) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is None:
            raise NotImplementedError("tiled VAE supports group-norm self-attention only")
        batch, channels, height, width = x.shape
        statistics = self.statistics(attn.group_norm, x)

        def tokens(band):
            return group_norm(band, attn.group_norm, statistics).flatten(2).transpose(1, 2)

        def heads(t):
            return t.reshape(batch, t.shape[1], attn.heads, -1).transpose(1, 2)

        keys, values = [], []
        for top in range(0, height, self.rows):
            normed = tokens(x[:, :, top:top + self.rows])
            keys.append(heads(attn.to_k(normed)))
            values.append(heads(attn.to_v(normed)))
        key, value = torch.cat(keys, 2), torch.cat(values, 2)
        del keys, values

        def attend(band):
            query = heads(attn.to_q(tokens(band)))
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            out = out.transpose(1, 2).reshape(batch, channels, band.shape[2], width)
            if attn.residual_connection:
                out = out + band
            return out / attn.rescale_output_factor

        return self._local(attend, x, halo=0)

    def _mid_steps(self, mid) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        steps = [partial(self.resnet, mid.resnets[0])]
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                steps.append(partial(self._attention, attn))
            steps.append(partial(self.resnet, resnet))
        return steps

    def _head(self, x):
        net = self.net
        pre = self._norm_act(net.conv_norm_out, net.conv_act, x)
        return self._local(lambda b: net.conv_out(pre(b)), x)
