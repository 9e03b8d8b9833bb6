"""S3Diff: one UNet step at t=999 on SD-Turbo, with degradation-guided LoRA in the VAE encoder and the UNet.

A degradation estimator (DEResNet, `de_net.pth`) scores the input's blur and noise in [0, 1]; small MLPs
(nets.s3diff_modulation) turn them into one r x r matrix per block that modulates every LoRA layer, so the
adapters adapt to each image. Release: ArcticHare105/S3Diff (checkpoints.s3diff). Facts: ../shared/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffsr.backbone import Backbone, load_backbone
from diffsr.checkpoints import s3diff as release
from diffsr.errors import UsageError, WeightsError, first_line
from diffsr.images import Picture, as_picture, pad_to_multiple
from diffsr.knobs import Knobs, check_value, knob
from diffsr.lora import load_lora_state
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.nets.de_net import DEResNet, load_de_net
from diffsr.nets.s3diff_modulation import DegradationConditioner, add_modulated_lora
from diffsr.samplers import guide, one_step
from diffsr.tiling import TilingOptions, vae_decode, vae_encode

TIMESTEP = 999
TILE_SIZE = 96  # latent px, the release's default (overlap 32)
PAD_MULTIPLE = 64  # the release reflect-pads the upscaled input to a multiple of 64
POSITIVE_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                   "and natural lighting.")
NEGATIVE_PROMPT = ("oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, "
                   "oversmooth")
GUIDANCE_SCALE = 1.07  # the released code; the paper reports 1.1


def check_degradation(degradation) -> tuple[float | None, float | None]:
    """(blur, noise) with None for 'estimate this one'; each given score must lie in [0, 1]."""
    if degradation is None:
        return None, None
    try:
        blur, noise = degradation
    except (TypeError, ValueError):
        raise UsageError(f"degradation must be a pair (blur, noise), got {degradation!r}") from None
    for name, value in (("blur", blur), ("noise", noise)):
        check_value(f"degradation {name}", value, {"kind": float, "low": 0, "high": 1})
    return tuple(None if value is None else float(value) for value in (blur, noise))


@dataclass(frozen=True)
class S3DiffKnobs(Knobs):
    """S3Diff's per-call knobs, with the release's defaults (inference_s3diff.py)."""

    prompt: str = knob(POSITIVE_PROMPT, "the positive prompt")
    negative_prompt: str = knob(NEGATIVE_PROMPT, "the negative prompt of classifier-free guidance")
    guidance_scale: float = knob(GUIDANCE_SCALE, "classifier-free guidance scale (1 disables the negative prompt)",
                                 low=0)
    degradation: tuple | None = knob(None, "(blur, noise) scores in [0, 1] used instead of the estimator's; "
                                           "None, or None for one of them, estimates it", kind=None)
    show_degradation: bool = knob(False, "print each image's degradation scores")
    sample_posterior: bool = knob(False, "sample the VAE posterior instead of taking its mode")

    def check(self) -> None:
        if self.degradation is not None:  # as a pair of floats (or None: estimated)
            object.__setattr__(self, "degradation", check_degradation(self.degradation))


class S3Diff(Upscaler):
    name = "s3diff"
    default_base = "sd-turbo"
    default_color_fix = "wavelet"
    weights_name = "s3diff.pkl"
    Knobs = S3DiffKnobs

    def __init__(self, backbone: Backbone, estimator: DEResNet, ranks=(release.RANK_VAE, release.RANK_UNET),
                 targets=(release.VAE_TARGETS, release.UNET_TARGETS), sample_posterior: bool = False):
        """New degradation-guided adapters (peft's init) of `ranks` (vae, unet) on `targets` of `backbone`."""
        self.backbone = backbone
        self.conditioner = DegradationConditioner(*ranks).to(backbone.device)
        try:
            self.vae_modulation, self.unet_modulation = add_modulated_lora(
                backbone.vae, backbone.unet, *targets, *ranks, release.VAE_ADAPTER, release.UNET_ADAPTER)
        except ValueError as error:  # peft: no module matched the targets
            raise WeightsError(f"its LoRA targets do not fit this base model ({first_line(error)})") from None
        self.estimator = estimator.to(backbone.device)  # small: float32 whatever the model's dtype
        self.sample_posterior = sample_posterior
        self.alpha_bar = backbone.alphas_cumprod[TIMESTEP].item()

    @classmethod
    def load(cls, base, weights, device="cpu", dtype="float32", de_net=None, sample_posterior: bool = False,
             merge_lora: bool = False) -> "S3Diff":
        """`de_net`: the degradation estimator's weights; by default `de_net.pth` beside `weights`."""
        if merge_lora:
            raise UsageError("s3diff's LoRA depends on each image's degradation and cannot be merged (drop --merge-lora)")
        if weights is None:
            raise UsageError("s3diff needs its weights: pass weights='s3diff.pkl' (--weights)")
        parts = release.read(weights)
        estimator = load_de_net(release.find_de_net(weights, de_net))
        try:
            method = cls(load_backbone(base, device, dtype), estimator, (parts.rank_vae, parts.rank_unet),
                         (parts.vae_targets, parts.unet_targets), sample_posterior)
            method.load_parts(parts)
        except WeightsError as error:
            raise WeightsError(f"{weights}: {error}") from None
        method.conditioner.requires_grad_(False)
        return method

    def load_parts(self, parts: release.Parts) -> None:
        """The release's tensors into the adapters (the UNet's conv_in is trained in full, not LoRA-wrapped)."""
        try:
            self.conditioner.load_state_dict(parts.conditioner, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"degradation MLPs do not fit ranks {self.conditioner.ranks}: "
                               f"{str(error).splitlines()[-1].strip()}") from None
        load_lora_state(self.backbone.unet, parts.unet, release.stored_by_unet, "state_dict_unet", complete=True)
        load_lora_state(self.backbone.vae, parts.vae, release.stored_by_vae, "state_dict_vae", complete=True)

    def knob_defaults(self) -> dict:
        return {"sample_posterior": self.sample_posterior}  # the load option

    @torch.no_grad()
    def estimate_degradation(self, image) -> tuple[float, float]:
        """(blur, noise) in [0, 1] as the estimator sees the input image (before any resizing)."""
        blur, noise = self.estimator(as_picture(image).to_tensor().to(self.device))[0].tolist()
        return blur, noise

    def degradation_scores(self, picture: Picture, degradation=None) -> tuple[float, float]:
        """The user's (blur, noise), with the estimator's score wherever the user gave None."""
        given = check_degradation(degradation)
        estimated = self.estimate_degradation(picture) if None in given else given
        return tuple(mine if mine is not None else theirs for mine, theirs in zip(given, estimated))

    def prepare_knobs(self, picture: Picture, knobs: dict) -> dict:
        """The degradation (blur, noise) is estimated on the input picture, before it is resized."""
        given = check_degradation(knobs.get("degradation"))
        scores = self.degradation_scores(picture, given)
        if knobs.get("show_degradation"):
            labels = ["given" if value is not None else "estimated" for value in given]
            print(f"{picture.name}: degradation blur {scores[0]:.4f} ({labels[0]}), noise {scores[1]:.4f} ({labels[1]})")
        return {**knobs, "degradation": scores}

    def one_step(self, image: torch.Tensor, scores: torch.Tensor, eps_at, encode=None, decode=None) -> torch.Tensor:
        """S3Diff's step, for inference and training alike (differentiable): degradation scores (1 or B, 2)
        modulate the LoRA of the VAE encoder and the UNet, then image [-1, 1] -> latent (`encode`, unscaled;
        default a posterior draw, as the release trains) -> eps at t=999 (`eps_at`) -> x0 -> decoded [-1, 1]."""
        vae = self.backbone.vae
        # hold, not use: with gradient checkpointing the backward pass runs the LoRA layers again.
        self.vae_modulation.hold(self.conditioner.matrices("vae", scores))
        self.unet_modulation.hold(self.conditioner.matrices("unet", scores))
        encode = encode or (lambda x: vae.encode(x).latent_dist.sample())
        decode = decode or (lambda latent: vae.decode(latent).sample)
        return one_step(image, encode, eps_at, decode, self.alpha_bar, vae.config.scaling_factor)[1]

    def noise(self, latent: torch.Tensor, text: torch.Tensor, negative: torch.Tensor | None = None,
              scale: float = 1.0) -> torch.Tensor:
        """eps at t=999 for text states (1 or B, 77, d); guided: both branches in one UNet call, the positive
        rows first as released; scale 1 skips the negative branch."""
        return guide(lambda x, texts: self.backbone.unet(x, TIMESTEP, encoder_hidden_states=texts).sample,
                     latent, text, negative, scale, batched=True, negative_first=False)

    def preprocess(self, picture: Picture, scale: float) -> Prepared:
        """As inference_s3diff.py: the [0, 1] input upscaled by `scale`, bilinear (align_corners False)."""
        lr = picture.to_tensor()
        size = (round(lr.shape[-2] * scale), round(lr.shape[-1] * scale))
        upscaled = F.interpolate(lr, size=size, mode="bilinear", align_corners=False)
        return Prepared(upscaled, output_size(picture, scale))

    @torch.no_grad()
    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                **given) -> torch.Tensor:
        knobs = self.settings(given)
        if knobs.degradation is None or None in knobs.degradation:
            raise UsageError("restore needs both degradation scores (blur, noise); upscale() estimates them")
        vae, dtype = self.backbone.vae, self.dtype
        text, negative = self.backbone.encode_prompt([knobs.prompt, knobs.negative_prompt]).chunk(2)

        def encode(image):
            posterior = vae_encode(vae, image, tiling)
            return posterior.sample(generator) if knobs.sample_posterior else posterior.mode()

        def denoise(latents, conditions=None):  # the tiler's contract; S3Diff's condition is the latent itself
            return self.noise(latents.to(dtype), text, negative, knobs.guidance_scale)

        height, width = lr.shape[-2:]
        image = pad_to_multiple((lr * 2 - 1).clamp(-1, 1), PAD_MULTIPLE).to(dtype)
        scores = torch.tensor([knobs.degradation], dtype=torch.float32, device=self.device)
        decoded = self.one_step(image, scores, lambda latent: tiling.aggregate(denoise, latent, None, TILE_SIZE,
                                                                              self.backbone.unet),
                                encode, lambda latent: vae_decode(vae, latent.to(dtype), tiling))
        return decoded[..., :height, :width].float().mul_(0.5).add_(0.5)
