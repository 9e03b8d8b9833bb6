"""Any image size in bounded memory: latent aggregation and tiled VAE encode/decode, shared by every method.

Latent aggregation (StableSR sec. 3.3, Algorithm 1): the latent is split into overlapping tiles snapped to the
right and bottom edges; the method's denoiser runs on batches of tiles; the outputs are merged with Gaussian
weights as sum(w * pred) / sum(w). The sampler then takes one step on the whole latent, so aggregation happens
at every step. A method supplies only `denoise(latent_tiles, condition_tiles) -> prediction_tiles`.

Tiled VAE, three ways, chosen by size and the memory budget:
- untiled: the image fits in one tile;
- exact: the encoder/decoder run module by module over row bands of the feature map; each GroupNorm pools its
  statistics over all bands before normalising and the mid-block attention attends over the whole map, so the
  result equals the untiled one up to float error. The feature maps are held whole on the compute device; only
  the per-operation working memory is bounded;
- bounded: the same, with every map taller than a band spilled off the compute device (host RAM for an
  accelerator, a temporary file for the CPU, `spill.SpilledMap`) and read back band by band, and the attention
  merged over chunks of keys; the bands' rows follow from the budget, so the device's memory stops growing with
  the image (but for the input and output tensors, and bands as wide as the image). Still equal to the untiled
  result up to float error, at about the untiled cost.
Both tiled modes run the VAE with our own block-by-block code (vae_runner.VaeRunner).
`callbacks` {resnet block: callback(block, output, runner)} run after given blocks and see whole maps (tensors,
or spilled maps in the bounded mode); a callback that computes on them does so through the runner it is given
(StableSR's CFW decoder). The work done is reported to the options' `progress` (diffsr.progress): encoder and
decoder runs, and every batch of denoiser tiles.
The parts: options (TilingOptions), budget (memory, tile sizes and bands), aggregate (latent aggregation),
vae (the entry points), vae_runner (the runner), spill (maps off the device), norms (GroupNorm over bands).
Written by hand: diffusers' own VAE tiling normalises each tile with its own statistics (visible seams).
"""

from diffsr.tiling.aggregate import DEFAULT_OVERLAP, GAUSSIAN_VAR, Denoiser, aggregate, gaussian_weights, tile_starts
from diffsr.tiling.budget import (DECODER_TILE, ENCODER_TILE, LIVE_MAPS, UNET_BYTES_PER_LATENT_PX, VAE_MODES,
                                  available_memory, return_freed_memory, trim_heap, vae_band_rows,
                                  vae_bytes_per_latent_px, vae_plan, vae_tile)
from diffsr.tiling.options import TILING_KNOBS, TilingOptions
from diffsr.tiling.norms import Statistics, group_norm
from diffsr.tiling.spill import SpilledMap
from diffsr.tiling.vae import encode_plan, vae_decode, vae_encode
from diffsr.tiling.vae_runner import Callback, FeatureMap, VaeRunner

__all__ = [
    "Callback", "FeatureMap", "SpilledMap", "Statistics", "VaeRunner", "group_norm",
    "DECODER_TILE", "DEFAULT_OVERLAP", "ENCODER_TILE", "GAUSSIAN_VAR", "LIVE_MAPS", "TILING_KNOBS",
    "UNET_BYTES_PER_LATENT_PX", "VAE_MODES", "Denoiser", "TilingOptions", "aggregate", "available_memory",
    "encode_plan", "gaussian_weights", "return_freed_memory", "tile_starts", "trim_heap", "vae_band_rows",
    "vae_bytes_per_latent_px", "vae_decode", "vae_encode", "vae_plan", "vae_tile",
]
