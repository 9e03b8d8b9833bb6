"""CCSR: truncated diffusion with a ControlNet on SD 2.1-base and a fine-tuned VAE decoder (csslc/CCSR; paper: Sun
et al., "Improving the Stability and Efficiency of Diffusion Models for Content Consistent Super-Resolution").
Releases: v2, a diffusers folder (checkpoints.ccsr_v2); v1, an LDM checkpoint (checkpoints.ccsr_v1) converted on
load to the same modules; what they do differently is in methods/ccsr_releases.py. Facts: ../shared/METHODS.md."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from diffsr import knobs as knobs_module
from diffsr.backbone import load_backbone, resolve_dtype
from diffsr.checkpoints import ccsr_v1, ccsr_v2
from diffsr.errors import UsageError
from diffsr.images import Picture
from diffsr.knobs import knob
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.methods.ccsr_releases import (GUIDANCE_OFF, V1_DEFAULTS, V2_DEFAULTS, processing_image, v1_draws,
                                          v1_quantized, v2_draws)
from diffsr.nets.ccsr_controlnet import controlnet_from_unet
from diffsr.samplers import diffusers_truncated_schedule, guide, ldm_truncated_schedule, truncated_sample
from diffsr.tiling import TilingOptions, vae_decode, vae_encode

PROCESS_SIZE = 512


@dataclass(frozen=True)
class Knobs(knobs_module.Knobs):
    """The paper's T steps and truncation t_max > t_min (fractions of T). None: the variant's release default
    (V1_DEFAULTS / V2_DEFAULTS; sample_posterior: the load option)."""

    prompt: str | None = knob(None, "text prompt (v1: empty; v2: 'clean, high-resolution, 8k')", kind=str)
    negative_prompt: str | None = knob(None, "negative prompt of the guidance (v1: empty; v2: the release's)", kind=str)
    steps: int | None = knob(None, "diffusion steps T (v1: 45; v2: 1, one step)", low=1, kind=int)
    t_max: float | None = knob(None, "where the chain starts, x T (v1: 0.6667; v2: 0.6666)", low=0, high=1, kind=float)
    t_min: float | None = knob(None, "where the chain stops, x T (v1: 0.3333; v2: 0)", low=0, high=1, kind=float)
    guidance_scale: float | None = knob(None, "guidance scale (v1: 1 is none; v2 guides above 1)", low=0, low_open=True,
                                        kind=float)
    sample_posterior: bool | None = knob(None, "v2: sample the LR latent's VAE posterior, else its mean", kind=bool)

    def check(self) -> None:
        """The chain must exist: t_min below t_max and, with several steps, a DDPM step between them."""
        steps, t_max, t_min = self.steps, self.t_max, self.t_min
        if t_max is not None and t_min is not None and t_min >= t_max:
            raise UsageError(f"t_min ({t_min}) must be smaller than t_max ({t_max})")
        if None not in (steps, t_max, t_min) and steps > 1 and round(steps * t_max) <= round(steps * t_min):
            raise UsageError(f"steps={steps} with t_max={t_max}, t_min={t_min} leaves no denoising step: round(steps*"
                             f"t_max)={round(steps * t_max)} must exceed round(steps*t_min)={round(steps * t_min)}")


class CCSR(Upscaler):
    name = "ccsr"
    default_base = "sd21-base"
    default_color_fix = "adain"
    weights_name = "CCSR-v2 folder (controlnet/ + vae/) or real-world_ccsr.ckpt"
    Knobs = Knobs

    def __init__(self, backbone, controlnet, version: int, condition_vae=None, sample_posterior: bool = True,
                 process_size: int = PROCESS_SIZE):
        self.backbone, self.controlnet, self.version = backbone, controlnet, version
        self.condition_vae = condition_vae or backbone.vae  # v1's own encoder copy (`cond_encoder`); v2's VAE
        self.sample_posterior, self.process_size = sample_posterior, process_size
        self.defaults = {**(V2_DEFAULTS if version == 2 else V1_DEFAULTS), "sample_posterior": sample_posterior}
        # v1's inference_ccsr.py brings its sample (truncated to 8 bits) to the output size with Lanczos, and
        # colour-fixes the decoded image as it is, clamping after the fix
        self.output_resample = "lanczos" if version == 1 else "bicubic"
        self.clamp_before_color_fix = version == 2
        self.evaluations = 0  # ControlNet + UNet calls since loading (a batched CFG pair counts once)

    @classmethod
    def load(cls, base, weights, device="cpu", dtype="float32", sample_posterior: bool = True,
             process_size: int = PROCESS_SIZE) -> "CCSR":
        if weights is None:
            raise UsageError("ccsr needs its weights: the CCSR-v2 folder (controlnet/ + vae/) or real-world_ccsr.ckpt")
        condition_vae = None
        if ccsr_v2.detect(weights):
            parts = ccsr_v2.read(weights, resolve_dtype(dtype, device))
            backbone, controlnet = load_backbone(base, device, dtype, vae=parts.vae), parts.controlnet
        else:
            backbone = load_backbone(base, device, dtype)
            parts = ccsr_v1.read(weights, backbone.unet.config, backbone.vae.config)
            controlnet, condition_vae = parts.load_onto(weights, backbone)
        for module in filter(None, (controlnet, backbone.vae, condition_vae)):
            module.requires_grad_(False).eval().to(device=backbone.device)
        return cls(backbone, controlnet, 1 if condition_vae else 2, condition_vae, sample_posterior, process_size)

    @classmethod
    def for_training(cls, base, weights=None) -> "CCSR":
        """A v2 model to train (float32, CPU): from a CCSR-v2 folder (vae/ optional: the release's pre-trained
        ControlNet has none), else with a ControlNet copied from the base's UNet as the release initialises it."""
        parts = ccsr_v2.read(weights, need_vae=False) if weights is not None else None
        backbone = load_backbone(base, vae=parts and parts.vae)
        return cls(backbone, parts.controlnet if parts else controlnet_from_unet(backbone.unet, condition_seed=0), 2)

    def knob_defaults(self) -> dict:
        return self.defaults  # this release's (v1 or v2)

    def denoiser_passes(self, knobs: dict) -> int:
        """The chain's evaluations; v1 guides each with two separate calls (v2 batches the pair)."""
        settings = self.settings(knobs)
        two_calls = self.version == 1 and not GUIDANCE_OFF[1](settings.guidance_scale)
        return self.schedule(settings).evaluations * (2 if two_calls else 1)

    def schedule(self, settings: Knobs):
        build = diffusers_truncated_schedule if self.version == 2 else ldm_truncated_schedule
        return build(self.backbone.scheduler_config, settings.steps, settings.t_max, settings.t_min)

    def preprocess(self, picture: Picture, scale: float) -> Prepared:
        rgb = processing_image(picture.rgb, scale, self.process_size, self.version)
        return Prepared(Picture(rgb).to_tensor(), output_size(picture, scale))

    def denoiser_tile(self, latent: torch.Tensor, tiling: TilingOptions) -> int:
        """Both releases denoise the whole latent (their scripts tile only on request); so does diffsr unless
        `tile_size` is given or the whole latent does not fit the memory budget, which is said once."""
        height, width = latent.shape[-2:]
        tile = tiling.denoiser_tile(-(-max(height, width) // 8) * 8, self.backbone.unet, latent.device, self.dtype)
        if tiling.tile_size is None and height * width > tile * tile:
            warnings.warn(f"ccsr: a {height}x{width} latent does not fit the memory budget in one pass: denoising in "
                          f"{tile}x{tile} tiles (the release samples it whole)", stacklevel=2)
        return tile

    def quantize(self, image: torch.Tensor, dtype) -> np.ndarray:
        return v1_quantized(image) if self.version == 1 and dtype == np.uint8 else super().quantize(image, dtype)

    def denoise(self, latent: torch.Tensor, condition: torch.Tensor, text: torch.Tensor, t) -> torch.Tensor:
        """The core, one network evaluation (inference and training): ControlNet on (latent, condition latent), then
        the UNet with its residuals -> eps. `t`: a timestep or one per row; `text` is repeated over the rows (tiles
        come stacked, each with the text's rows). Differentiable."""
        self.evaluations += 1
        text = text.repeat(latent.shape[0] // text.shape[0], 1, 1)
        timestep = torch.as_tensor(t, device=latent.device).expand(latent.shape[0])
        latent, condition = latent.to(self.dtype), condition.to(self.dtype)
        down, mid = self.controlnet(latent, timestep, text, condition)
        return self.backbone.unet(latent, timestep, encoder_hidden_states=text, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample

    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                **knobs) -> torch.Tensor:
        latent = self.sample_latent(lr, generator, tiling, **knobs)
        vae = self.backbone.vae
        image = vae_decode(vae, (latent / vae.config.scaling_factor).to(self.dtype), tiling).float().div_(2).add_(0.5)
        return image.clamp_(0, 1) if self.clamp_before_color_fix else image

    def sample_latent(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                      **knobs) -> torch.Tensor:
        """The restored (scaled) latent of one image (stage-2 training decodes it), drawn as each release draws."""
        self.check_knobs(knobs)
        settings, v2, off = self.settings(knobs), self.version == 2, GUIDANCE_OFF[self.version]
        schedule, guided = self.schedule(settings), not off(settings.guidance_scale)
        embeds = self.backbone.encode_prompt([settings.prompt] + ([settings.negative_prompt] if guided else []))
        text, negative = embeds[:1], (embeds[1:] if guided else None)
        scaling = self.condition_vae.config.scaling_factor
        posterior = vae_encode(self.condition_vae, (lr * 2 - 1).to(self.dtype), tiling)
        if v2:
            condition, start, renoise, step_noise = v2_draws(posterior, scaling, 2 if guided else 1,
                                                             settings.sample_posterior, schedule, generator, lr)
        else:
            condition, start, renoise, step_noise = v1_draws(posterior, scaling, generator)
        tile = self.denoiser_tile(start, tiling)

        def model(x, t, cfg):
            def call(x, texts):
                return tiling.aggregate(lambda tiles, conditions: self.denoise(tiles, conditions, texts, t), x,
                                        condition[:len(x)], tile, self.backbone.unet).float()
            if v2 and not cfg:  # v2's first estimate takes the first half of its CFG batch: the negative prompt
                return call(x, text if negative is None else negative)
            # v2 batches the pair, negative first; v1 makes two calls, at every evaluation the first included
            return guide(call, x, text, negative, settings.guidance_scale, batched=v2, off=off)

        return truncated_sample(model, start, schedule, renoise=renoise, step_noise=step_noise)

