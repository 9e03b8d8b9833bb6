"""VAE encode and decode of any size: untiled, exact or bounded (diffsr.tiling's notes), as the budget says.
Progress: one unit per untiled run, per block of the network in the tiled modes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from diffsr.errors import UsageError
from diffsr.progress import Progress
from diffsr.tiling.budget import vae_plan
from diffsr.tiling.options import TilingOptions
from diffsr.tiling.vae_runner import Callback, VaeRunner

Callbacks = dict[torch.nn.Module, Callback]


def vae_encode(vae, image: torch.Tensor, options: TilingOptions = TilingOptions(), mode: str | None = None,
               callbacks: Callbacks | None = None):
    """`vae.encode(image).latent_dist` for an image of any size (see diffsr.tiling for the modes).

    `callbacks` {resnet block: callback(block, output, runner)} are called after those blocks of the encoder
    with whole feature maps: tensors, or in the bounded mode spilled maps (see vae_runner). A float16 pass whose
    result is not finite is redone with the VAE in float32 (`_float32_if_not_finite`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if image.shape[-1] % 8 or image.shape[-2] % 8:
        raise UsageError(f"image size {tuple(image.shape[-2:])} must be a multiple of 8 pixels to encode")
    progress = options.progress or Progress()

    def encode(image):
        run_mode, rows = encode_plan(options, vae, image, mode)
        if run_mode == "untiled":
            return _run_untiled(lambda: vae.encode(image).latent_dist, callbacks, progress, "encode").parameters
        with torch.no_grad():  # the tiled modes are for inference
            moments = _run_tiled(VaeRunner(vae.encoder, rows, run_mode == "bounded", callbacks), image, progress,
                                 "encode")
            return moments if vae.quant_conv is None else vae.quant_conv(moments)

    return DiagonalGaussianDistribution(_float32_if_not_finite(encode, image, [vae], "encode"))


def _run_untiled(run, callbacks: Callbacks | None, progress: Progress, phase: str):
    """One whole-tensor run (the autograd mode kept: training goes through here), reported as one unit."""
    progress.start(phase, 1)
    with _forward_hooks(callbacks):
        result = run()
    progress.advance(phase)
    return result


def encode_plan(options: TilingOptions, vae, image: torch.Tensor, mode: str | None = None) -> tuple[str, int]:
    """`vae_plan` for encoding `image`: (mode, rows)."""
    latent_hw = (image.shape[-2] // 8, image.shape[-1] // 8)
    return vae_plan(options, vae, latent_hw, False, image.device, image.dtype, mode)


def vae_decode(vae, latent: torch.Tensor, options: TilingOptions = TilingOptions(), mode: str | None = None,
               callbacks: Callbacks | None = None, callback_modules: Sequence[torch.nn.Module] = ()):
    """`vae.decode(latent).sample` (latent unscaled) for a latent of any size.

    `callbacks` on the decoder's resnet blocks are called as in `vae_encode`, and may replace the block's output
    (StableSR's fusion layers, which run their own blocks through the runner they are given). Untiled runs keep
    the autograd mode (training decodes through here); the tiled modes run without gradients. A float16 result
    that is not finite is redone in float32, as in `vae_encode`, with `callback_modules` (the modules the
    callbacks run) upcast along with the VAE."""
    progress = options.progress or Progress()

    def decode(latent):
        run_mode, rows = vae_plan(options, vae, latent.shape[-2:], True, latent.device, latent.dtype, mode)
        if run_mode == "untiled":
            return _run_untiled(lambda: vae.decode(latent).sample, callbacks, progress, "decode")
        with torch.no_grad():
            if vae.post_quant_conv is not None:
                latent = vae.post_quant_conv(latent)
            return _run_tiled(VaeRunner(vae.decoder, rows, run_mode == "bounded", callbacks), latent, progress,
                              "decode")

    return _float32_if_not_finite(decode, latent, (vae, *callback_modules), "decode")


def _float32_if_not_finite(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          modules: Sequence[torch.nn.Module], phase: str) -> torch.Tensor:
    """`run(x)`; when x is float16 and the result has inf or NaN values (float16 overflows at 65504, as VAEs'
    activations can on some images), run again on x in float32 with `modules` upcast for that run, and return
    that result in float16. One warning names the redo."""
    result = run(x)
    if x.dtype != torch.float16 or torch.isfinite(result).all():
        return result
    warnings.warn(f"the float16 VAE {phase} overflowed (inf or NaN values): redone in float32", stacklevel=3)
    with _in_float32(modules):
        return run(x.float()).to(x.dtype)


@contextmanager
def _in_float32(modules: Sequence[torch.nn.Module]):
    """float16 `modules` in float32 for the block, then in float16 again (exact both ways). `.float()` and
    `.half()`, not `.to(dtype)`: diffusers' `to` warns about keep-in-float32 modules even when there are none."""
    try:
        for module in modules:
            module.float()
        yield
    finally:
        for module in modules:
            module.half()


def _run_tiled(runner: VaeRunner, x: torch.Tensor, progress: Progress, phase: str) -> torch.Tensor:
    """The tiled modes report each block (over all its row bands) as one unit of `phase`."""
    progress.start(phase, len(runner.steps()))
    return runner(x, advance=lambda: progress.advance(phase))


@contextmanager
def _forward_hooks(callbacks: Callbacks | None):
    """The callbacks as torch forward hooks while an untiled VAE runs as diffusers wrote it."""
    handles = [block.register_forward_hook(lambda module, inputs, output, call=call: call(module, output, None))
               for block, call in (callbacks or {}).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
