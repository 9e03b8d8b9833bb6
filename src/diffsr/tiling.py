"""Any image size in bounded memory: latent aggregation and tiled VAE encode/decode, shared by every method.

Latent aggregation (StableSR sec. 3.3, Algorithm 1): the latent is split into overlapping tiles snapped to the
right and bottom edges; the method's denoiser runs on batches of tiles; the outputs are merged with Gaussian
weights as sum(w * pred) / sum(w). The sampler then takes one step on the whole latent, so aggregation happens
at every step. A method supplies only `denoise(latent_tiles, condition_tiles) -> prediction_tiles`.

Tiled VAE, three ways, chosen by size and the memory budget:
- untiled: the image fits in one tile;
- exact: the encoder/decoder run module by module over row bands of the feature map; each GroupNorm pools its
  statistics over all bands before normalising and the mid-block attention attends over the whole map, so the
  result equals the untiled one up to float error. The feature maps are held whole (on the compute device),
  only the per-operation working memory is bounded;
- bounded: each tile (with a halo of context) runs through the whole network on its own, twice: first with
  its own GroupNorm statistics, which are pooled over all tiles, then with the pooled statistics, shared by all
  tiles (so no brightness jumps); attention stays within the tile. Memory stops growing at the tile size; the
  result approximates the untiled one.
Forward hooks on the VAE's resnet blocks see whole maps in the first two modes and one tile at a time in the
third (`bounded_tile()` says which); StableSR's CFW decoder relies on this. The work done is reported to the
options' `progress` (diffsr.progress): encoder and decoder runs, and every batch of denoiser tiles.
Written by hand: diffusers' own VAE tiling normalises each tile with its own statistics (visible seams).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from diffsr.errors import UsageError
from diffsr.progress import Progress

GAUSSIAN_VAR = 0.01  # the papers' weight: sigma = 0.1 * tile
DEFAULT_OVERLAP = 32  # latent px
ENCODER_TILE = 128  # latent px (1024 image px), as the releases
DECODER_TILE = 224  # latent px, as the releases
DECODER_HALO = 11  # latent px of context around a bounded-mode decoder tile, as the releases
ENCODER_HALO = 4  # latent px (32 image px)
# Rough peak working memory of an SD-2.x UNet pass per latent pixel (float32, batch 1, 320 base channels).
UNET_BYTES_PER_LATENT_PX = 64 * 1024
LIVE_MAPS = 4  # feature maps alive at once (measured: SD VAE decoder tile, bf16, ~4 maps of its widest stage)

TILING_KNOBS = ("tile_size", "tile_overlap", "vae_tile_size", "tile_batch", "max_memory", "release_gaussian")


@dataclass(frozen=True)
class TilingOptions:
    """How to split work that does not fit. Sizes are in latent pixels (8 image pixels each)."""

    tile_size: int | None = None  # denoiser tile; None: the method's default, shrunk to fit max_memory
    tile_overlap: int = DEFAULT_OVERLAP
    vae_tile_size: int | None = None  # VAE encoder and decoder tile; None: derived from max_memory
    tile_batch: int = 1  # denoiser tiles per call
    max_memory: float | None = None  # GB of working memory (model weights not counted); None: from the device
    release_gaussian: bool = False  # the releases' off-centre Gaussian and square tiles, for parity
    # Where this call's work is reported (not a knob: `upscale` sets it from its `callback=`)
    progress: Progress | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_knobs(cls, knobs: dict) -> "TilingOptions":
        """Take the tiling knobs out of `knobs` (removing them) and check them."""
        given = {name: knobs.pop(name) for name in TILING_KNOBS if name in knobs}
        return cls(**{name: value for name, value in given.items() if value is not None}).checked()

    def checked(self) -> "TilingOptions":
        for name in ("tile_size", "vae_tile_size"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise UsageError(f"{name} {value} must be a positive multiple of 8 latent pixels")
        if self.tile_overlap < 0 or self.tile_overlap % 8:
            raise UsageError(f"tile_overlap {self.tile_overlap} must be a non-negative multiple of 8 latent pixels")
        if self.tile_size is not None and self.tile_overlap >= self.tile_size:
            raise UsageError(f"tile_size {self.tile_size} must be larger than tile_overlap {self.tile_overlap}")
        if self.tile_batch < 1:
            raise UsageError(f"tile_batch {self.tile_batch} must be at least 1")
        if self.max_memory is not None and self.max_memory <= 0:
            raise UsageError(f"max_memory {self.max_memory} GB must be positive")
        return self

    def budget_bytes(self, device: torch.device) -> float:
        if self.max_memory is not None:
            return self.max_memory * 1e9
        return available_memory(device)

    def denoiser_tile(self, default: int, unet: torch.nn.Module, device, dtype: torch.dtype) -> int:
        """The given tile size, else the method's default shrunk until a batch of tiles fits the budget."""
        if self.tile_size is not None:
            return self.tile_size
        width = unet.config.block_out_channels[0] / 320
        per_px = UNET_BYTES_PER_LATENT_PX * width * _itemsize(dtype) / 4 * self.tile_batch
        fitting = _multiple_of_8(math.sqrt(self.budget_bytes(torch.device(device)) / per_px))
        tile = max(min(default, fitting), self.tile_overlap + 8)
        return tile


    def aggregate(self, denoise: "Denoiser", latent: torch.Tensor, condition: torch.Tensor | None, default_tile: int,
                  unet: torch.nn.Module) -> torch.Tensor:
        """`aggregate` with these options: the method gives its default tile size and its UNet (for sizing).
        Every method's denoiser passes come through here; each batch of tiles is reported to `progress`."""
        tile = self.denoiser_tile(default_tile, unet, latent.device, unet.dtype)
        return aggregate(denoise, latent, condition, tile, self.tile_overlap, self.tile_batch, self.release_gaussian,
                         self.progress)


def available_memory(device: torch.device) -> float:
    """Bytes a computation may use now: most of the free accelerator memory, or half the free RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    try:
        import psutil

        return 0.5 * psutil.virtual_memory().available
    except ImportError:
        return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
HEAP_BLOCK_LIMIT = 1 << 20  # bytes


@functools.cache
def return_freed_memory() -> bool:
    """On glibc, serve every block of 1 MB or more with its own mmap, so that freed feature maps go straight back
    to the system. glibc's default raises this threshold to 32 MB once large blocks are freed (loading a model
    does), and tile-sized buffers then come from heaps that fragment: the first full-size VAE decoder tile after
    loading OSEDiff peaked 1.4 GB higher (+3.20 against +1.84 GB) and kept 1.4 GB after it returned. Costs about
    6% CPU time (benchmarks/bounded_decode_memory.py). Once per process; does nothing elsewhere or when
    MALLOC_MMAP_THRESHOLD_ is set. True if applied."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _multiple_of_8(value: float) -> int:
    return max(8, int(value) // 8 * 8)


# -- latent aggregation ----------------------------------------------------------------------------------


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


Denoiser = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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


# -- tiled VAE ---------------------------------------------------------------------------------------------


def _stage_channels_scales(block_out_channels, decoder: bool) -> list[tuple[int, float]]:
    """(channels, area relative to the latent) of every feature map size the encoder/decoder produces."""
    levels = len(block_out_channels)
    if decoder:
        channels = list(reversed(block_out_channels))
        return [(c, 4.0 ** i) for i, c in enumerate(channels)] + [
            (c, 4.0 ** (i + 1)) for i, c in enumerate(channels[:-1])]  # upsampler outputs
    scales = [4.0 ** (levels - 1 - i) for i in range(levels)]
    return list(zip(block_out_channels, scales)) + [(c, s / 4) for c, s in zip(block_out_channels[:-1], scales[:-1])]


def vae_bytes_per_latent_px(vae, decoder: bool, dtype: torch.dtype) -> float:
    """Memory of the live feature maps per latent pixel at the widest stage of the encoder or decoder."""
    stages = _stage_channels_scales(vae.config.block_out_channels, decoder)
    return LIVE_MAPS * max(c * s for c, s in stages) * _itemsize(dtype)


def vae_tile(options: TilingOptions, vae, decoder: bool, device, dtype) -> int:
    """The VAE tile in latent pixels: given, else the release default shrunk until one tile with its halo
    of context fits the budget."""
    if options.vae_tile_size is not None:
        return options.vae_tile_size
    default, halo = (DECODER_TILE, DECODER_HALO) if decoder else (ENCODER_TILE, ENCODER_HALO)
    per_px = vae_bytes_per_latent_px(vae, decoder, dtype)
    fitting = math.sqrt(options.budget_bytes(torch.device(device)) / per_px) - 2 * halo
    return min(default, _multiple_of_8(fitting))


def vae_plan(options: TilingOptions, vae, latent_hw, decoder: bool, device, dtype) -> tuple[str, int]:
    """(mode, tile) for encoding/decoding a latent of `latent_hw`: untiled when it is no larger than a tile
    in area; exact when the whole feature maps fit the budget (exact mode bounds only the per-operation
    working memory: attention, convolution buffers); bounded otherwise."""
    tile = vae_tile(options, vae, decoder, device, dtype)
    height, width = latent_hw
    if height * width <= tile * tile:
        return "untiled", tile
    whole_maps = height * width * vae_bytes_per_latent_px(vae, decoder, dtype)
    return ("exact" if whole_maps <= options.budget_bytes(torch.device(device)) else "bounded"), tile


def vae_encode(vae, image: torch.Tensor, options: TilingOptions = TilingOptions(), mode: str | None = None,
               statistics: dict | None = None):
    """`vae.encode(image).latent_dist` for an image of any size (see the module notes for the modes).

    Forward hooks on the encoder's resnet blocks fire with whole feature maps in the untiled and exact modes,
    and once per tile in bounded mode. In bounded mode, a `statistics` dict receives the pooled GroupNorm
    statistics, with which `shared_statistics` re-runs any part of the encoder later (StableSR's CFW)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if image.shape[-1] % 8 or image.shape[-2] % 8:
        raise UsageError(f"image size {tuple(image.shape[-2:])} must be a multiple of 8 pixels to encode")
    auto, tile = encode_plan(options, vae, image)
    mode = mode or auto
    progress = options.progress or Progress()
    progress.start("encode", 1)
    if mode == "untiled":
        posterior = vae.encode(image).latent_dist
        progress.advance("encode")
        return posterior
    with torch.no_grad():  # the tiled modes are for inference
        if mode == "exact":
            moments = _ExactRunner(vae.encoder, rows=tile).encode(image)
        else:
            moments = _run_bounded(vae.encoder, image, 8 * tile, 8 * ENCODER_HALO, 1 / 8, unit=8,
                                   statistics=statistics)
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
    progress.advance("encode")
    return DiagonalGaussianDistribution(moments)


def encode_plan(options: TilingOptions, vae, image: torch.Tensor) -> tuple[str, int]:
    """`vae_plan` for encoding `image`: (mode, tile)."""
    latent_hw = (image.shape[-2] // 8, image.shape[-1] // 8)
    return vae_plan(options, vae, latent_hw, False, image.device, image.dtype)


def vae_decode(vae, latent: torch.Tensor, options: TilingOptions = TilingOptions(), mode: str | None = None,
               hooked: tuple[torch.nn.Module, ...] = ()):
    """`vae.decode(latent).sample` (latent unscaled) for a latent of any size.

    Forward hooks on the decoder's resnet blocks fire as in `vae_encode`; in bounded mode `bounded_tile()`
    tells a hook which part of the latent the current tile covers. `hooked`: modules such hooks call whose
    GroupNorms must share the pooled statistics too (StableSR's fusion layers). Untiled runs keep the
    autograd mode (training decodes through here); the tiled modes run without gradients."""
    auto, tile = vae_plan(options, vae, latent.shape[-2:], True, latent.device, latent.dtype)
    mode = mode or auto
    progress = options.progress or Progress()
    progress.start("decode", 1)
    if mode == "untiled":
        image = vae.decode(latent).sample
    else:
        with torch.no_grad():
            if vae.post_quant_conv is not None:
                latent = vae.post_quant_conv(latent)
            if mode == "exact":
                image = _ExactRunner(vae.decoder, rows=tile).decode(latent)
            else:
                image = _run_bounded(vae.decoder, latent, tile, DECODER_HALO, 8, hooked=hooked)
    progress.advance("decode")
    return image


# exact mode: module by module over row bands, pooled GroupNorm statistics, whole-map attention


def _norm_stats(x: torch.Tensor, groups: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _group_sums(x: torch.Tensor, groups: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, sum, sum of squares) per (batch, group) in float32, one group at a time so that no
    float32 copy of the whole (possibly half-precision) map is made."""
    per_group = x.shape[1] // groups
    sums, squares = [], []
    for group in range(groups):
        part = x[:, group * per_group:(group + 1) * per_group].float().flatten(1)
        sums.append(part.sum(1))
        squares.append((part * part).sum(1))
    return x[0, :per_group].numel(), torch.stack(sums, 1), torch.stack(squares, 1)


def _normalize(x: torch.Tensor, norm: torch.nn.GroupNorm, stats) -> torch.Tensor:
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


class _ExactRunner:
    """Runs a diffusers VAE Encoder/Decoder module by module over row bands of `rows` rows."""

    def __init__(self, net: torch.nn.Module, rows: int):
        self.net = net
        self.rows = max(rows, 8)

    def _local(self, fn, x: torch.Tensor, halo: int = 1, up: int = 1) -> torch.Tensor:
        """fn applied band by band; fn is local with `halo` rows of context and scales rows by `up`."""
        height = x.shape[2]
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
        out = None
        for top in range(0, out_height, band_rows):
            bottom = min(top + band_rows, out_height)
            y = down(x[:, :, 2 * top:min(2 * bottom + 1, height)])[:, :, :bottom - top]
            if out is None:
                out = x.new_empty((x.shape[0], y.shape[1], out_height, y.shape[3]), dtype=y.dtype)
            out[:, :, top:bottom] = y
        return out

    def _norm_act(self, norm, act, x):
        stats = _norm_stats(x, norm.num_groups, self.rows)
        return lambda band: act(_normalize(band, norm, stats))

    def _resnet(self, block, x: torch.Tensor) -> torch.Tensor:
        if block.time_emb_proj is not None or block.upsample is not None or block.downsample is not None:
            raise NotImplementedError("tiled VAE supports plain resnet blocks only")
        pre1 = self._norm_act(block.norm1, block.nonlinearity, x)
        hidden = self._local(lambda b: block.conv1(pre1(b)), x)
        pre2 = self._norm_act(block.norm2, block.nonlinearity, hidden)
        hidden = self._local(lambda b: block.conv2(block.dropout(pre2(b))), hidden)
        shortcut = x if block.conv_shortcut is None else self._local(block.conv_shortcut, x, halo=0)
        out = (shortcut + hidden) / block.output_scale_factor
        # The block never runs as a module here, so its forward hooks (StableSR's CFW) are called by hand.
        for hook in block._forward_hooks.values():
            changed = hook(block, (x,), out)
            out = out if changed is None else changed
        return out

    def _attention(self, attn, x: torch.Tensor) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is None:
            raise NotImplementedError("tiled VAE supports group-norm self-attention only")
        batch, channels, height, width = x.shape
        stats = _norm_stats(x, attn.group_norm.num_groups, self.rows)

        def tokens(band):
            return _normalize(band, attn.group_norm, stats).flatten(2).transpose(1, 2)

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

    def _mid(self, mid, x):
        x = self._resnet(mid.resnets[0], x)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                x = self._attention(attn, x)
            x = self._resnet(resnet, x)
        return x

    def _head(self, x):
        net = self.net
        pre = self._norm_act(net.conv_norm_out, net.conv_act, x)
        return self._local(lambda b: net.conv_out(pre(b)), x)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = self._local(net.conv_in, image)
        for block in net.down_blocks:
            for resnet in block.resnets:
                x = self._resnet(resnet, x)
            for down in block.downsamplers or ():
                x = self._downsample(down, x)
        return self._head(self._mid(net.mid_block, x))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = self._local(net.conv_in, latent)
        x = self._mid(net.mid_block, x)
        for block in net.up_blocks:
            for resnet in block.resnets:
                x = self._resnet(resnet, x)
            for up in block.upsamplers or ():
                x = self._local(up, x, halo=1, up=2)
        return self._head(x)


# bounded mode: each tile on its own, GroupNorm statistics pooled over a first pass

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
            return _normalize(x, norm, use[norm])
        count, total, squares = _group_sums(x, norm.num_groups)
        before = record.get(norm, (0, 0.0, 0.0))
        record[norm] = (before[0] + count, before[1] + total, before[2] + squares)
        mean = total / count
        return _normalize(x, norm, (mean, (squares / count - mean * mean).clamp_min(0)))

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


def _tile_boxes(size: int, tile: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split [0, size) into the fewest equal-as-possible parts no longer than `tile`, cut at multiples of
    `unit` (8 for the encoder's input: each part must map onto whole latent pixels)."""
    count = math.ceil(size / tile)
    edges = [round(i * size / unit / count) * unit for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _run_bounded(net, x: torch.Tensor, tile: int, halo: int, scale: float, unit: int = 1,
                 hooked: tuple[torch.nn.Module, ...] = (), statistics: dict | None = None) -> torch.Tensor:
    """Each core tile of `x` (tile x tile, plus `halo` of context) through `net`; outputs `scale` x the input.

    Two passes: the first runs every tile with its own GroupNorm statistics and pools them over all tiles;
    the second normalises every tile with the pooled statistics, so all tiles share one brightness. The
    GroupNorms of `hooked` modules take part too; `statistics`, if given, receives the pooled statistics."""
    height, width = x.shape[-2:]
    boxes = []
    for top, bottom in _tile_boxes(height, tile, unit):
        for left, right in _tile_boxes(width, tile, unit):
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
