"""StableSR: SD 2.1 UNet with SFT layers driven by a time-aware encoder of the LR latent, multi-step sampling, and a
CFW decoder that trades fidelity (w -> 1) for realism (w -> 0). Release: IceClear/StableSR, a .ckpt pair read by
diffsr.checkpoints.stablesr. Facts: ../shared/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffsr import knobs
from diffsr.backbone import Backbone, load_backbone
from diffsr.checkpoints import stablesr as checkpoint
from diffsr.checkpoints.stablesr import CFW_NAME  # noqa: F401  (its name, for callers)
from diffsr.errors import UsageError
from diffsr.images import Picture
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.nets.stablesr_nets import CFWAutoencoder, SFTUNet, TimeAwareEncoder
from diffsr.samplers import (PREDICTIONS, Schedule, guide, q_sample, randn, release_ddim_alphas, sample_ddim, sample_ddpm,
                             space_timesteps)
from diffsr.tiling import TilingOptions

SAMPLERS = ("ddpm", "ddim")
STARTS = ("lr", "noise")
NEGATIVE_PROMPT = "3d, cartoon, anime, sketches, (worst quality:2), (low quality:2)"  # the DDIM script's
START_TIMESTEP = 999
DEFAULT_START = {"ddpm": "lr", "ddim": "noise"}  # as the release's canvas_tile DDPM and DDIM scripts
PAD_MULTIPLE = 32  # the release reflect-pads the upscaled LR to a multiple of 32 px (see release_padding)
# The registry's variants (checkpoints.stablesr.release_item) whose release scripts use other knob defaults.
VARIANT_KNOBS = {"stablesr-turbo": {"steps": 4}}


@dataclass(frozen=True)
class StableSRKnobs(knobs.Knobs):
    """StableSR's per-call knobs, with the release scripts' defaults (a variant may change some: VARIANT_KNOBS)."""

    prompt: str = knobs.knob("", "text prompt (the release's: empty)")
    negative_prompt: str = knobs.knob(NEGATIVE_PROMPT, "negative prompt, used when guidance_scale is not 1 "
                                                       "(the release's DDIM script's)")
    steps: int = knobs.knob(200, "sampling steps (release: 200; StableSR-Turbo: 4)", low=1, high=1000)
    sampler: str = knobs.knob("ddpm", "sampler: the release's DDPM or DDIM script", choices=SAMPLERS)
    guidance_scale: float = knobs.knob(1.0, "classifier-free guidance scale (1 = off)")
    fidelity: float = knobs.knob(0.5, "CFW weight w: 0 = realism, 1 = fidelity to the input", low=0, high=1)
    eta: float = knobs.knob(0.0, "DDIM eta (0 = deterministic)", low=0)
    start: str | None = knobs.knob(None, "the first latent: lr (the LR latent noised to t=999) or noise "
                                         "(default: lr for ddpm, noise for ddim, as the release's scripts)",
                                   choices=STARTS, kind=str)

    @property
    def start_latent(self) -> str:
        return self.start or DEFAULT_START[self.sampler]


def release_padding(height: int, width: int) -> tuple[int, int]:
    """(bottom, right) reflect padding of the release's scripts: none when both sides are multiples of 32, else
    each side up to the next multiple of 32 *above* it, so a side that already is one grows by 32 too."""
    if height % PAD_MULTIPLE == 0 and width % PAD_MULTIPLE == 0:
        return 0, 0
    return PAD_MULTIPLE - height % PAD_MULTIPLE, PAD_MULTIPLE - width % PAD_MULTIPLE


class StableSR(Upscaler):
    name = "stablesr"
    default_base = "sd21-base"
    default_color_fix = "adain"
    clamp_before_color_fix = False  # the release's scripts colour-fix the decoded image, then clamp
    weights_name = "stablesr_000117.ckpt"
    Knobs = StableSRKnobs

    def __init__(self, backbone: Backbone, unet: SFTUNet, encoder: TimeAwareEncoder, autoencoder: CFWAutoencoder,
                 prediction: str = "epsilon", defaults: dict | None = None, process_size: int | None = None):
        """`defaults`: the variant's release knob values where they differ from StableSRKnobs' (turbo: 4 steps)."""
        self.backbone = backbone
        self.unet, self.encoder, self.autoencoder = unet, encoder, autoencoder
        self.prediction = prediction
        self.defaults = dict(defaults or {})
        self.scaling_factor = autoencoder.vae.config.scaling_factor
        # The release's --input_size: the base's native size, 512 for SD 2.1-base, 768 for the 768-v model.
        native = backbone.unet.config.sample_size * 2 ** (len(autoencoder.vae.config.block_out_channels) - 1)
        self.process_size = process_size or native

    @classmethod
    def load(cls, base, weights, device="cpu", dtype="float32", cfw_weights=None,
             prediction_type: str | None = None, process_size: int | None = None) -> "StableSR":
        if weights is None:
            raise UsageError(f"stablesr needs its weights: pass weights='{cls.weights_name}' (--weights)")
        weights = Path(weights)
        backbone = load_backbone(base, device, dtype)
        prediction = prediction_type or backbone.scheduler_config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction type '{prediction}' (choose {', '.join(PREDICTIONS)})")
        variant = checkpoint.release_item(weights)
        checkpoint.check_prediction(weights, variant, prediction)
        configs = backbone.unet.config, backbone.vae.config, backbone.unet.config.norm_num_groups
        parts = checkpoint.read_model(weights, *configs)
        unet = SFTUNet(backbone.unet, *checkpoint.sft_shapes(parts.unet))
        checkpoint.load_into(backbone.unet, parts.unet, weights, "UNet")
        encoder = TimeAwareEncoder(**parts.encoder_config)
        checkpoint.load_into(encoder, parts.encoder, weights, "time-aware encoder")
        vae_parts, vae_path = checkpoint.read_autoencoder(weights, cfw_weights, parts, *configs)
        autoencoder = CFWAutoencoder(backbone.vae, with_fusion=bool(vae_parts.fusion))
        if vae_parts.vae:
            checkpoint.load_into(backbone.vae, vae_parts.vae, vae_path, "autoencoder")
        if vae_parts.fusion:
            checkpoint.load_into(autoencoder.fusion, vae_parts.fusion, vae_path, "CFW fusion layers")
        for module in (unet, encoder, autoencoder):  # the new SFT/encoder/fusion layers were built in float32
            module.requires_grad_(False).eval().to(device=backbone.device, dtype=backbone.dtype)
        defaults = VARIANT_KNOBS.get(variant.name) if variant else None
        return cls(backbone, unet, encoder, autoencoder, prediction, defaults, process_size)

    # A release .ckpt (model or CFW file) as the safetensors copy `load` also reads (diffsr convert, the registry).
    convert_weights = staticmethod(checkpoint.convert)

    def knob_defaults(self) -> dict:
        return self.defaults  # the variant's (VARIANT_KNOBS)

    def denoiser_passes(self, knobs: dict) -> int:
        return len(space_timesteps(len(self.backbone.alphas_cumprod), self.settings(knobs).steps))

    def preprocess(self, picture: Picture, scale: float) -> Prepared:
        """As the release's arbitrary-size scripts: bicubic (torch, on the [-1, 1] tensor) by
        max(process_size / shorter side, scale); the result is brought back to scale x input afterwards."""
        lr = picture.to_tensor()
        height, width = lr.shape[-2:]
        factor = max(self.process_size / min(height, width), scale)
        lr = F.interpolate(lr, size=(int(height * factor), int(width * factor)), mode="bicubic").clamp(0, 1)
        return Prepared(lr, output_size(picture, scale))

    def network(self, latent: torch.Tensor, condition: torch.Tensor, timestep: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        """The denoiser (differentiable; the trainer's loss calls it too): time-aware encoder on the LR latent
        `condition` at t, then the SFT UNet on `latent`. Returns eps (or v for a v-prediction base)."""
        if condition.shape[0] != latent.shape[0]:  # guidance stacks [negative; positive] copies of the latent
            condition = condition.repeat(latent.shape[0] // condition.shape[0], 1, 1, 1)
        maps = self.encoder(condition.to(self.dtype), timestep)
        return self.unet(latent.to(self.dtype), timestep, text, maps)

    def sample(self, condition: torch.Tensor, text: torch.Tensor, generator: torch.Generator, steps: int,
               sampler: str = "ddpm", negative: torch.Tensor | None = None, guidance_scale: float = 1.0,
               eta: float = 0.0, start: str = "lr", tiler=None) -> torch.Tensor:
        """Denoise from t=999 to a clean latent, conditioned on the (scaled) LR latent `condition`. Draws in the
        release's order: the LR start's noise (drawn even when starting from pure noise, as the scripts do), the
        pure-noise start, the sampler's. `tiler(denoise, latent, condition)`, when given, runs `denoise` over
        tiles and merges the predictions (tiling.aggregate; guidance per tile is the same, the merge is linear)."""
        alphas_cumprod = self.backbone.alphas_cumprod
        noise = randn(condition.shape, generator, condition, torch.float32)
        if start == "lr":  # the LR latent noised to t=999 on the full schedule
            x = q_sample(condition.float(), noise, alphas_cumprod[START_TIMESTEP].item())
        else:
            x = randn(condition.shape, generator, condition, torch.float32)

        def model(latent, timestep):
            def denoise(tiles, condition_tiles):
                def call(x_, texts):
                    return self.network(x_, condition_tiles, timestep[:1].expand(x_.shape[0]), texts)

                return guide(call, tiles, text, negative, guidance_scale)

            return denoise(latent, condition) if tiler is None else tiler(denoise, latent, condition)

        schedule = Schedule.respaced(alphas_cumprod, steps)
        if sampler == "ddpm":
            return sample_ddpm(model, x, schedule, generator, self.prediction)
        return sample_ddim(model, x, schedule, eta, generator, self.prediction,
                           release_ddim_alphas(alphas_cumprod, steps))

    def color_reference(self, lr: torch.Tensor) -> torch.Tensor:
        """`lr` padded as `restore` pads it: the release colour-fixes the padded image, then crops the padding."""
        pad_h, pad_w = release_padding(*lr.shape[-2:])
        return F.pad(lr, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else lr

    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                **given) -> torch.Tensor:
        knobs = self.settings(given)
        image = self.color_reference(lr) * 2 - 1  # the release's reflect padding to a multiple of 32
        dist, features = self.autoencoder.encode(image.to(self.dtype), tiling)
        condition = dist.sample(generator) * self.scaling_factor
        backbone = self.backbone
        text = backbone.encode_prompt([knobs.prompt])
        negative = backbone.encode_prompt([knobs.negative_prompt]) if knobs.guidance_scale != 1 else None
        tile = self.process_size // 8  # the release's latent tile: --input_size / 8 (64, or 96 for the 768-v model)
        latent = self.sample(condition, text, generator, knobs.steps, knobs.sampler, negative, knobs.guidance_scale,
                             knobs.eta, knobs.start_latent,
                             tiler=lambda denoise, x, cond: tiling.aggregate(denoise, x, cond, tile, backbone.unet))
        decoded = self.autoencoder.decode((latent / self.scaling_factor).to(self.dtype), features, knobs.fidelity,
                                          tiling)
        return decoded.float().add_(1).div_(2)  # unclamped, padded: as the release colour-fixes it
