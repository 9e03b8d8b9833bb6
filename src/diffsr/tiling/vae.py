"""VAE encode and decode of any size: untiled, exact or bounded (diffsr.tiling's notes), as the budget says.
Progress: one unit per untiled run, per block in exact mode, per tile run in bounded mode."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from diffsr.errors import UsageError
from diffsr.progress import Progress
from diffsr.tiling.budget import DECODER_HALO, ENCODER_HALO, vae_plan
from diffsr.tiling.options import TilingOptions
from diffsr.tiling.vae_bounded import run_bounded
from diffsr.tiling.vae_exact import WHOLE, Callback, VaeRunner

Callbacks = dict[torch.nn.Module, Callback]


def vae_encode(vae, image: torch.Tensor, options: TilingOptions = TilingOptions(), mode: str | None = None,
               callbacks: Callbacks | None = None, statistics: dict | None = None):
    """`vae.encode(image).latent_dist` for an image of any size (see diffsr.tiling for the modes).

    `callbacks` {resnet block: callback(block, output, region)} are called after those blocks of the
    encoder, with whole feature maps in the untiled and exact modes and once per tile in bounded mode (the
    region says which part, see vae_exact.Region). In bounded mode, a `statistics` dict receives the pooled
    GroupNorm statistics, with which any part of the encoder can be re-run later (`resnet_block`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if image.shape[-1] % 8 or image.shape[-2] % 8:
        raise UsageError(f"image size {tuple(image.shape[-2:])} must be a multiple of 8 pixels to encode")
    auto, tile = encode_plan(options, vae, image)
    mode = mode or auto
    progress = options.progress or Progress()
    if mode == "untiled":
        return _run_untiled(lambda: vae.encode(image).latent_dist, callbacks, progress, "encode")
    with torch.no_grad():  # the tiled modes are for inference
        if mode == "exact":
            moments = _run_exact(VaeRunner(vae.encoder, rows=tile, callbacks=callbacks), image, progress, "encode")
        else:
            moments = run_bounded(vae.encoder, image, 8 * tile, 8 * ENCODER_HALO, 1 / 8, unit=8, sampled=False,
                                  callbacks=callbacks, statistics=statistics, progress=progress, phase="encode")
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
    return DiagonalGaussianDistribution(moments)


def _run_untiled(run, callbacks: Callbacks | None, progress: Progress, phase: str):
    """One whole-tensor run (the autograd mode kept: training goes through here), reported as one unit."""
    progress.start(phase, 1)
    with _forward_hooks(callbacks):
        result = run()
    progress.advance(phase)
    return result


def encode_plan(options: TilingOptions, vae, image: torch.Tensor) -> tuple[str, int]:
    """`vae_plan` for encoding `image`: (mode, tile)."""
    latent_hw = (image.shape[-2] // 8, image.shape[-1] // 8)
    return vae_plan(options, vae, latent_hw, False, image.device, image.dtype)


def vae_decode(vae, latent: torch.Tensor, options: TilingOptions = TilingOptions(), mode: str | None = None,
               callbacks: Callbacks | None = None):
    """`vae.decode(latent).sample` (latent unscaled) for a latent of any size.

    `callbacks` on the decoder's resnet blocks are called as in `vae_encode`; in bounded mode the region tells
    a callback which part of the latent the current tile covers and how GroupNorms it runs must normalise
    (StableSR's fusion layers). Untiled runs keep the autograd mode (training decodes through here); the tiled
    modes run without gradients."""
    auto, tile = vae_plan(options, vae, latent.shape[-2:], True, latent.device, latent.dtype)
    mode = mode or auto
    progress = options.progress or Progress()
    if mode == "untiled":
        return _run_untiled(lambda: vae.decode(latent).sample, callbacks, progress, "decode")
    with torch.no_grad():
        if vae.post_quant_conv is not None:
            latent = vae.post_quant_conv(latent)
        if mode == "exact":
            return _run_exact(VaeRunner(vae.decoder, rows=tile, callbacks=callbacks), latent, progress, "decode")
        return run_bounded(vae.decoder, latent, tile, DECODER_HALO, 8, callbacks=callbacks, progress=progress,
                           phase="decode")


def _run_exact(runner: VaeRunner, x: torch.Tensor, progress: Progress, phase: str) -> torch.Tensor:
    """The exact mode reports each block (over all its row bands) as one unit of `phase`."""
    progress.start(phase, len(runner.steps()))
    return runner(x, advance=lambda: progress.advance(phase))


@contextmanager
def _forward_hooks(callbacks: Callbacks | None):
    """The callbacks as torch forward hooks while an untiled VAE runs as diffusers wrote it."""
    handles = [block.register_forward_hook(lambda module, inputs, output, call=call: call(module, output, WHOLE))
               for block, call in (callbacks or {}).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
