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
- bounded: each tile (with a halo of context) runs through the whole network on its own, normalised with
  GroupNorm statistics shared by all tiles (so no brightness jumps); attention stays within the tile. The
  shared statistics are pooled from a first pass, each box with its own statistics, over every tile (encoder)
  or a sample of tile-sized boxes spread from edge to edge (decoder: about a quarter of a large latent).
  Memory stops growing at the tile size; the result approximates the untiled one.
The tiled modes run the VAE with our own block-by-block code (vae_exact.VaeRunner), which is told what each
GroupNorm normalises with (a function passed in, norms.StatisticsOf) rather than patching the modules.
`callbacks` {resnet block: callback(block, output, region)} run after given blocks and see whole maps in the
first two modes and one tile at a time in the third, the Region saying which part and which statistics their
own GroupNorms must use; StableSR's CFW decoder relies on this. The work done is reported to the options'
`progress` (diffsr.progress): encoder and decoder runs, and every batch of denoiser tiles.
The parts: options (TilingOptions), budget (memory and tile sizes), aggregate (latent aggregation),
vae (the entry points), vae_exact and vae_bounded (the runners), norms (GroupNorm with given statistics).
Written by hand: diffusers' own VAE tiling normalises each tile with its own statistics (visible seams).
"""

from diffsr.tiling.aggregate import DEFAULT_OVERLAP, GAUSSIAN_VAR, Denoiser, aggregate, gaussian_weights, tile_starts
from diffsr.tiling.budget import (DECODER_HALO, DECODER_TILE, ENCODER_HALO, ENCODER_TILE, LIVE_MAPS,
                                  UNET_BYTES_PER_LATENT_PX, available_memory, return_freed_memory,
                                  vae_bytes_per_latent_px, vae_plan, vae_tile)
from diffsr.tiling.options import TILING_KNOBS, TilingOptions
from diffsr.tiling.norms import Statistics, StatisticsOf, given_statistics, group_norm
from diffsr.tiling.vae import encode_plan, vae_decode, vae_encode
from diffsr.tiling.vae_bounded import sample_spans, tile_boxes
from diffsr.tiling.vae_exact import Callback, Region, resnet_block

__all__ = [
    "Callback", "Region", "Statistics", "StatisticsOf", "given_statistics", "group_norm", "resnet_block",
    "DECODER_HALO", "DECODER_TILE", "DEFAULT_OVERLAP", "ENCODER_HALO", "ENCODER_TILE", "GAUSSIAN_VAR", "LIVE_MAPS",
    "TILING_KNOBS", "UNET_BYTES_PER_LATENT_PX", "Denoiser", "TilingOptions", "aggregate", "available_memory",
    "encode_plan", "gaussian_weights", "return_freed_memory", "sample_spans", "tile_boxes",
    "tile_starts", "vae_bytes_per_latent_px", "vae_decode", "vae_encode", "vae_plan", "vae_tile",
]
