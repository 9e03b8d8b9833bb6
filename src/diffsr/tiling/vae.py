"""VAE encode and decode of any size: untiled, exact or bounded (diffsr.tiling's notes), as the budget says."""

from __future__ import annotations

import torch

from diffsr.errors import UsageError
from diffsr.progress import Progress
from diffsr.tiling.budget import DECODER_HALO, ENCODER_HALO, vae_plan
from diffsr.tiling.options import TilingOptions
from diffsr.tiling.vae_bounded import run_bounded
from diffsr.tiling.vae_exact import ExactRunner


def vae_encode(vae, image: torch.Tensor, options: TilingOptions = TilingOptions(), mode: str | None = None,
               statistics: dict | None = None):
    """`vae.encode(image).latent_dist` for an image of any size (see diffsr.tiling for the modes).

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
            moments = ExactRunner(vae.encoder, rows=tile).encode(image)
        else:
            moments = run_bounded(vae.encoder, image, 8 * tile, 8 * ENCODER_HALO, 1 / 8, unit=8,
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
                image = ExactRunner(vae.decoder, rows=tile).decode(latent)
            else:
                image = run_bounded(vae.decoder, latent, tile, DECODER_HALO, 8, hooked=hooked)
    progress.advance("decode")
    return image

