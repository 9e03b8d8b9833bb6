"""The VAE runner: a diffusers Encoder/Decoder run block by block, by our own code, over row bands of whole
feature maps. Each GroupNorm pools its statistics over all bands before normalising and the mid-block attention
attends over the whole map, so the result equals the untiled one up to float error.

Where the whole maps live is the mode: on the compute device (exact mode: only the per-operation working memory
is bounded), or spilled off it (bounded mode, `spill.SpilledMap`: host RAM for an accelerator, a temporary file
for the CPU), where every operation reads the bands it needs and writes its output band by band, so that the
device holds a few bands at a time; a spilled map's GroupNorm statistics are measured as its bands are written,
so it is not read back for them. A map no taller than a band is kept whole on the device in both modes."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F

from diffsr.tiling.norms import RunningStatistics, Statistics, group_norm, map_statistics
from diffsr.tiling.spill import FilePool, ReadBuffer, SpilledMap

WHOLE_MAP = 1 << 30  # rows of a band that is always the whole map

FeatureMap = Union[torch.Tensor, SpilledMap]

# Called with a resnet block's output after the block and the runner (None when the VAE runs untiled, as
# diffusers wrote it: then the output is a tensor); a returned map replaces the output (StableSR's CFW).
Callback = Callable[[torch.nn.Module, FeatureMap, "VaeRunner | None"], "FeatureMap | None"]


class VaeRunner:
    """Runs a diffusers VAE Encoder or Decoder block by block over row bands of `rows` rows (None: whole maps),
    the same count at every resolution; `spill`: keep maps taller than a band off the compute device.
    `callbacks`: called after the given resnet blocks with (block, output, runner)."""

    def __init__(self, net: torch.nn.Module, rows: int | None = None, spill: bool = False,
                 callbacks: dict[torch.nn.Module, Callback] | None = None):
        self.net = net
        self.rows = WHOLE_MAP if rows is None else max(rows, 8)
        self.spill = spill
        self.callbacks = callbacks or {}
        # the group count of the net's GroupNorms (one for a whole diffusers VAE): spilled maps are measured
        # for it as they are written
        self.groups = next((m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)), None)
        self.files = FilePool()  # for the maps spilled to files (CPU), closed at the end of the run

    def steps(self) -> list[Callable[[FeatureMap], FeatureMap]]:
        """The network as a list of blocks (conv_in, resnets, attention, resamplers, head), each x -> x."""
        net = self.net
        steps = [partial(self.local, net.conv_in, halo=1)]
        if hasattr(net, "up_blocks"):  # a Decoder
            steps += self._mid_steps(net.mid_block)
            for block in net.up_blocks:
                steps += [partial(self.resnet, resnet) for resnet in block.resnets]
                steps += [partial(self.local, up, halo=1, up=2) for up in block.upsamplers or ()]
        else:
            for block in net.down_blocks:
                steps += [partial(self.resnet, resnet) for resnet in block.resnets]
                steps += [partial(self._downsample, down) for down in block.downsamplers or ()]
            steps += self._mid_steps(net.mid_block)
        return steps + [self._head]

    def __call__(self, x: torch.Tensor, advance: Callable[[], None] = lambda: None) -> torch.Tensor:
        """The network's output for `x` (a tensor on the device); `advance()` after every block."""
        try:
            for step in self.steps():
                x = step(x)
                advance()
            return x
        finally:
            self.files.close()

    # -- feature maps, band by band ------------------------------------------------------------------------

    @staticmethod
    def band(x: FeatureMap, top: int, bottom: int, buffer: ReadBuffer | None = None) -> torch.Tensor:
        """Rows [top, bottom) of map `x`, clipped to it, on the compute device (a spilled map's read into
        `buffer` if given: valid until its next read)."""
        if isinstance(x, SpilledMap):
            return x.rows(top, bottom, buffer)
        return x[:, :, max(top, 0):bottom]

    def bands(self, x: FeatureMap) -> Iterator[torch.Tensor]:
        """The bands of `x` in order, each valid until the next is taken."""
        buffer = ReadBuffer()
        return (self.band(x, top, top + self.rows, buffer) for top in range(0, x.shape[2], self.rows))

    def _new_map(self, like: torch.Tensor, height: int, whole: bool) -> FeatureMap:
        """An empty map of `height` rows shaped like the band `like`: spilled in bounded mode unless `whole`."""
        shape = (like.shape[0], like.shape[1], height, like.shape[3])
        if self.spill and not whole:
            return SpilledMap(shape, like.dtype, like.device, self.files)
        return like.new_empty(shape)

    def _assemble(self, parts: Iterator[tuple[int, torch.Tensor]], height: int, whole: bool) -> FeatureMap:
        """The map of `height` rows made of the bands `parts` (top row, band), each written before the next
        is made; a spilled map is measured for its GroupNorm statistics on the way in."""
        out = running = None
        for top, band in parts:
            if out is None:
                out = self._new_map(band, height, whole)
                if isinstance(out, SpilledMap) and self.groups is not None:
                    running = RunningStatistics(self.groups)
            if isinstance(out, SpilledMap):
                out.write(top, band)
            else:
                out[:, :, top:top + band.shape[2]] = band
            if running is not None:
                running.add(band)
        if running is not None:
            out.statistics[self.groups] = running.result()
        return out

    def statistics(self, x: FeatureMap, groups: int) -> Statistics:
        """GroupNorm statistics of map `x` over `groups` groups: measured while it was written if it was
        spilled, else now, band by band."""
        if isinstance(x, SpilledMap) and groups in x.statistics:
            return x.statistics[groups]
        return map_statistics(self.bands(x), groups)

    def local(self, fn, *maps: FeatureMap, halo: int = 0, up: int = 1, whole: bool = False) -> FeatureMap:
        """fn over row bands of `maps` (all of one height) with `halo` rows of context each side; fn is local
        within that context and scales rows by `up`. The result is whole on the device if `whole`."""
        height = maps[0].shape[2]
        if height <= self.rows:
            return fn(*(self.band(x, 0, height) for x in maps))
        buffers = [ReadBuffer() for _ in maps]

        def parts():
            for top in range(0, height, self.rows):
                bottom = min(top + self.rows, height)
                start, stop = max(top - halo, 0), min(bottom + halo, height)
                bands = (self.band(x, start, stop, buffer) for x, buffer in zip(maps, buffers))
                yield top * up, fn(*bands)[:, :, (top - start) * up:(bottom - start) * up]

        return self._assemble(parts(), height * up, whole)

    def _downsample(self, down, x: FeatureMap) -> FeatureMap:
        # Downsample2D pads one zero row/column at the bottom/right, then a 3x3 stride-2 conv.
        height = x.shape[2]
        out_height = (height - 2) // 2 + 1
        band_rows = max(self.rows // 2, 1)
        if out_height <= band_rows:
            return down(self.band(x, 0, height))
        buffer = ReadBuffer()

        def parts():
            for top in range(0, out_height, band_rows):
                bottom = min(top + band_rows, out_height)
                yield top, down(self.band(x, 2 * top, 2 * bottom + 1, buffer))[:, :, :bottom - top]

        return self._assemble(parts(), out_height, whole=False)

    # -- blocks --------------------------------------------------------------------------------------------

    def _norm_act(self, norm, act, x: FeatureMap):
        statistics = self.statistics(x, norm.num_groups)
        return lambda band: act(group_norm(band, norm, statistics))

    def resnet(self, block, x: FeatureMap) -> FeatureMap:
        """A diffusers ResnetBlock2D without time embedding, then its callback if it has one."""
        if block.time_emb_proj is not None or block.upsample is not None or block.downsample is not None:
            raise NotImplementedError("tiled VAE supports plain resnet blocks only")
        pre1 = self._norm_act(block.norm1, block.nonlinearity, x)
        hidden = self.local(lambda b: block.conv1(pre1(b)), x, halo=1)
        pre2 = self._norm_act(block.norm2, block.nonlinearity, hidden)
        shortcut = block.conv_shortcut if block.conv_shortcut is not None else (lambda b: b)  # 1x1 where widths differ
        out = self.local(lambda h, b: (shortcut(b) + block.conv2(block.dropout(pre2(h)))) / block.output_scale_factor,
                         hidden, x, halo=1)
        callback = self.callbacks.get(block)
        if callback is not None:
            changed = callback(block, out, self)
            out = out if changed is None else changed
        return out

    def _attention(self, attn, x: FeatureMap) -> FeatureMap:
        if attn.spatial_norm is not None or attn.group_norm is None:
            raise NotImplementedError("tiled VAE supports group-norm self-attention only")
        batch, channels, height, width = x.shape
        statistics = self.statistics(x, attn.group_norm.num_groups)

        def tokens(band):
            return group_norm(band, attn.group_norm, statistics).flatten(2).transpose(1, 2)

        def heads(t):
            return t.reshape(batch, t.shape[1], attn.heads, -1).transpose(1, 2)

        def keys_and_values(band):  # one map (batch, 2 x channels, rows, width): keys, then values
            normed = tokens(band)
            both = torch.cat([attn.to_k(normed), attn.to_v(normed)], dim=2)
            return both.transpose(1, 2).reshape(batch, -1, band.shape[2], width)

        def as_heads(keys_values):  # a map or band of them -> key, value: (batch, heads, tokens, head width)
            return tuple(heads(part.flatten(2).transpose(1, 2)) for part in keys_values.chunk(2, dim=1))

        keys_values = self.local(keys_and_values, x)  # one pass over x for both
        if isinstance(keys_values, SpilledMap):
            def attend_all(query):
                return attend_in_chunks(query, map(as_heads, self.bands(keys_values)), attn.scale)
        else:
            key, value = as_heads(keys_values)

            def attend_all(query):
                return F.scaled_dot_product_attention(query, key, value, scale=attn.scale)

        def attend(band):
            query = heads(attn.to_q(tokens(band)))
            out = attend_all(query)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            out = out.transpose(1, 2).reshape(batch, channels, band.shape[2], width)
            if attn.residual_connection:
                out = out + band
            return out / attn.rescale_output_factor

        return self.local(attend, x)

    def _mid_steps(self, mid) -> list[Callable[[FeatureMap], FeatureMap]]:
        steps = [partial(self.resnet, mid.resnets[0])]
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                steps.append(partial(self._attention, attn))
            steps.append(partial(self.resnet, resnet))
        return steps

    def _head(self, x: FeatureMap) -> torch.Tensor:
        net = self.net
        pre = self._norm_act(net.conv_norm_out, net.conv_act, x)
        return self.local(lambda b: net.conv_out(pre(b)), x, halo=1, whole=True)


def attend_in_chunks(query: torch.Tensor, chunks, scale: float) -> torch.Tensor:
    """softmax(query key^T * scale) value over (key, value) chunks, merged with running row maxima (flash
    attention's recurrence), so only one chunk's scores exist at a time; computed in float32. Written by hand:
    torch's attention returns no log-sum-exp to merge chunks with."""
    query = query.float() * scale
    out = total = peak = None
    for key, value in chunks:
        scores = query @ key.float().transpose(-1, -2)
        chunk_peak = scores.amax(-1, keepdim=True)
        new_peak = chunk_peak if peak is None else torch.maximum(peak, chunk_peak)
        weights = scores.sub_(new_peak).exp_()
        part, mass = weights @ value.float(), weights.sum(-1, keepdim=True)
        if out is None:
            out, total = part, mass
        else:
            rescale = (peak - new_peak).exp_()
            out, total = out.mul_(rescale).add_(part), total.mul_(rescale).add_(mass)
        peak = new_peak
    return out / total
