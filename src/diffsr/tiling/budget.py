"""The memory budget: how much working memory there is, how much the networks need per latent pixel (hints
declared as data below), and from those the tile sizes, the VAE mode (untiled, exact or bounded) and its bands."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UnetHint:
    """Rough peak working memory of a UNet pass per latent pixel (float32, batch 1) at a base width; other
    widths scale linearly."""

    bytes_per_latent_px: float
    base_channels: int


@dataclass(frozen=True)
class VaeHint:
    """A VAE encoder's or decoder's tiling: the releases' tile, and the feature maps alive at once (measured:
    SD VAE decoder tile, bf16, ~4 maps of its widest stage)."""

    tile: int  # latent px
    live_maps: int = 4
    # more where the convolutions run by NNPACK (CPU float32): its workspace is about twice the input of the
    # convolution it runs (full-size decoder at 1024 px: 3.7 maps direct, 5.6 by Winograd)
    winograd_maps: int = 2
    # more in the bounded mode: the reused read buffers of an operation's (up to two) spilled inputs
    spill_maps: int = 2


SD_UNET = UnetHint(bytes_per_latent_px=64 * 1024, base_channels=320)  # SD-2.x UNet
ENCODER = VaeHint(tile=128)  # 1024 image px tiles as the releases
DECODER = VaeHint(tile=224)  # as the releases
# bytes per pair of a query and a key in the bounded mode's chunked mid-block attention: float32 scores, their
# exponentials in place, and the slack of the product with the values
ATTENTION_BYTES_PER_PAIR = 12

VAE_MODES = ("untiled", "exact", "bounded")

UNET_BYTES_PER_LATENT_PX = SD_UNET.bytes_per_latent_px
ENCODER_TILE, DECODER_TILE = ENCODER.tile, DECODER.tile
LIVE_MAPS = DECODER.live_maps


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


def denoiser_tile(budget: float, unet: torch.nn.Module, dtype: torch.dtype, tile_batch: int,
                  hint: UnetHint = SD_UNET) -> int:
    """The largest denoiser tile (latent px, a multiple of 8) of which `tile_batch` fit `budget` bytes."""
    width = unet.config.block_out_channels[0] / hint.base_channels
    per_px = hint.bytes_per_latent_px * width * _itemsize(dtype) / 4 * tile_batch
    return _multiple_of_8(math.sqrt(budget / per_px))


def _stage_channels_scales(block_out_channels, decoder: bool) -> list[tuple[int, float]]:
    """(channels, area relative to the latent) of every feature map size the encoder/decoder produces."""
    levels = len(block_out_channels)
    if decoder:
        channels = list(reversed(block_out_channels))
        return [(c, 4.0 ** i) for i, c in enumerate(channels)] + [
            (c, 4.0 ** (i + 1)) for i, c in enumerate(channels[:-1])]  # upsampler outputs
    scales = [4.0 ** (levels - 1 - i) for i in range(levels)]
    return list(zip(block_out_channels, scales)) + [(c, s / 4) for c, s in zip(block_out_channels[:-1], scales[:-1])]


def _live_maps(vae, decoder: bool, dtype: torch.dtype) -> int:
    from diffsr.nets.winograd import runs_winograd

    hint = DECODER if decoder else ENCODER
    return hint.live_maps + (hint.winograd_maps if dtype == torch.float32 and runs_winograd(vae) else 0)


def vae_bytes_per_latent_px(vae, decoder: bool, dtype: torch.dtype) -> float:
    """Memory of the live feature maps per latent pixel at the widest stage of the encoder or decoder."""
    stages = _stage_channels_scales(vae.config.block_out_channels, decoder)
    return _live_maps(vae, decoder, dtype) * max(c * s for c, s in stages) * _itemsize(dtype)


def vae_tile(options, vae, decoder: bool, device, dtype) -> int:
    """The VAE tile in latent pixels for `options` (a TilingOptions): given, else the release default shrunk
    until a latent of one tile runs untiled within the budget. The exact mode runs bands of this many rows."""
    if options.vae_tile_size is not None:
        return options.vae_tile_size
    hint = DECODER if decoder else ENCODER
    fitting = math.sqrt(options.budget_bytes(torch.device(device)) / vae_bytes_per_latent_px(vae, decoder, dtype))
    return min(hint.tile, _multiple_of_8(fitting))


def vae_band_rows(options, vae, decoder: bool, latent_width: int, device, dtype) -> int:
    """Rows per band in the bounded mode (the same count at every stage): the given tile, else as many as fit
    the budget with the live bands of the widest stage and the spill copies, and the mid-block attention's
    scores of one band of queries against one band of keys (both at the latent's width)."""
    if options.vae_tile_size is not None:
        return options.vae_tile_size
    budget = options.budget_bytes(torch.device(device))
    stages = _stage_channels_scales(vae.config.block_out_channels, decoder)
    maps = _live_maps(vae, decoder, dtype) + (DECODER if decoder else ENCODER).spill_maps
    row_bytes = maps * max(c * math.sqrt(s) for c, s in stages) * latent_width * _itemsize(dtype)
    attention_rows = math.sqrt(budget / ATTENTION_BYTES_PER_PAIR) / latent_width
    return max(8, int(min(budget / row_bytes, attention_rows)))


def vae_plan(options, vae, latent_hw, decoder: bool, device, dtype, mode: str | None = None) -> tuple[str, int]:
    """(mode, rows) for encoding/decoding a latent of `latent_hw`: untiled when it is no larger than a tile in
    area; exact, in bands of a tile's rows, when the whole feature maps fit the budget; bounded, in bands of
    `vae_band_rows`, otherwise. A given `mode` is kept and gets its rows."""
    if mode not in (None, *VAE_MODES):
        raise ValueError(f"unknown VAE mode {mode!r}: one of {', '.join(VAE_MODES)}")
    tile = vae_tile(options, vae, decoder, device, dtype)
    height, width = latent_hw
    if mode is None:
        whole_maps = height * width * vae_bytes_per_latent_px(vae, decoder, dtype)
        mode = ("untiled" if height * width <= tile * tile
                else "exact" if whole_maps <= options.budget_bytes(torch.device(device)) else "bounded")
    return mode, (vae_band_rows(options, vae, decoder, width, device, dtype) if mode == "bounded" else tile)


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


def trim_heap() -> bool:
    """On glibc, give the heap's free pages back to the system (malloc_trim). Loading weights frees gigabytes of
    read and conversion buffers, and without the command line's threshold (`return_freed_memory`) glibc keeps
    those under its threshold: full-size StableSR stayed at 6.88 GB resident after load_upscaler, 4.54 GB after
    this call. One call, no lasting setting; does nothing elsewhere. True if memory was returned."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).malloc_trim(0))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _multiple_of_8(value: float) -> int:
    return max(8, int(value) // 8 * 8)
