"""S3Diff: one UNet step at t=999 on SD-Turbo, with degradation-guided LoRA in the VAE encoder and the UNet.

A degradation estimator (DEResNet, `de_net.pth`) scores the input's blur and noise in [0, 1]; small MLPs
turn the scores into one r x r matrix per block that modulates every LoRA layer (diffsr.lora), so the
adapters adapt to each image. Classifier-free guidance with the release's prompts runs both branches in
one batched UNet call. Release: ArcticHare105/S3Diff (`s3diff.pkl`). Facts: ../shared/METHODS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.backbone import Backbone, load_backbone
from diffsr.checkpoints import read_method_weights
from diffsr.errors import UsageError, WeightsError, first_line
from diffsr.images import Picture, as_picture
from diffsr.knobs import Knobs, knob
from diffsr.lora import LoraModulation, add_degradation_lora, load_lora_state
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.nets.de_net import DEResNet, load_de_net
from diffsr.samplers import x0_from_eps
from diffsr.tiling import TILING_KNOBS, TilingOptions, vae_decode, vae_encode

TIMESTEP = 999
TILE_SIZE = 96  # latent px, the release's default (overlap 32)
PAD_MULTIPLE = 64  # the release reflect-pads the upscaled input to a multiple of 64
POSITIVE_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                   "and natural lighting.")
NEGATIVE_PROMPT = ("oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, "
                   "oversmooth")
GUIDANCE_SCALE = 1.07  # the released code; the paper reports 1.1
UNET_ADAPTER, VAE_ADAPTER = "default", "vae_skip"
# What the release trains (and stores in s3diff.pkl): peft target names for the UNet, a regex for the VAE.
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
RANK_UNET, RANK_VAE = 32, 16
UNET_BLOCKS, VAE_BLOCKS = 10, 6
FOURIER_SIZE = 64  # random frequencies per score; sin and cos of two scores -> 4 * 64 features
BLOCK_EMBEDDING_SIZE = 64
WEIGHT_KEYS = ("unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet",
               "state_dict_vae", "state_dict_vae_de_mlp", "state_dict_unet_de_mlp", "state_dict_vae_block_mlp",
               "state_dict_unet_block_mlp", "state_dict_vae_fuse_mlp", "state_dict_unet_fuse_mlp", "w",
               "state_embeddings")


def unet_block(name: str) -> int:
    """Block of a UNet LoRA layer: down_blocks.i -> i, mid_block -> 4, up_blocks.i -> 5 + i, conv_out -> 9."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return UNET_BLOCKS - 1


def vae_block(name: str) -> int:
    """Block of a VAE-encoder LoRA layer: encoder.down_blocks.i -> i, mid_block -> 4, conv_in/conv_out -> 5."""
    parts = name.split(".")
    if parts[1] == "down_blocks":
        return int(parts[2])
    if parts[1] == "mid_block":
        return VAE_BLOCKS - 2
    return VAE_BLOCKS - 1


class DegradationConditioner(nn.Module):
    """Degradation scores (B, 2) -> the LoRA matrices C, (B, blocks, r, r), for the VAE encoder and the UNet.

    C = fuse_mlp(concat(de_mlp(fourier(scores)), block_mlp(block_embedding))), reshaped row-major to r x r.
    """

    def __init__(self, rank_vae: int = RANK_VAE, rank_unet: int = RANK_UNET):
        super().__init__()
        self.ranks = {"vae": rank_vae, "unet": rank_unet}
        self.register_buffer("w", torch.zeros(FOURIER_SIZE))  # fixed random frequencies
        for part, blocks, rank in (("vae", VAE_BLOCKS, rank_vae), ("unet", UNET_BLOCKS, rank_unet)):
            setattr(self, f"{part}_de_mlp", nn.Sequential(nn.Linear(4 * FOURIER_SIZE, 256), nn.ReLU()))
            setattr(self, f"{part}_block_mlp", nn.Sequential(nn.Linear(BLOCK_EMBEDDING_SIZE, 64), nn.ReLU()))
            setattr(self, f"{part}_fuse_mlp", nn.Linear(256 + 64, rank * rank))
            setattr(self, f"{part}_block_embeddings", nn.Embedding(blocks, BLOCK_EMBEDDING_SIZE))

    def fourier(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B, 256): [sin, cos] of 2 pi score w, for blur then noise."""
        angles = scores[..., None] * self.w * 2 * math.pi
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)

    def matrices(self, part: str, scores: torch.Tensor) -> torch.Tensor:
        """C for every block of `part` ("vae" or "unet"): (B, blocks, r, r)."""
        degradation = getattr(self, f"{part}_de_mlp")(self.fourier(scores))  # (B, 256)
        blocks = getattr(self, f"{part}_block_mlp")(getattr(self, f"{part}_block_embeddings").weight)  # (n, 64)
        batch, count, rank = degradation.shape[0], blocks.shape[0], self.ranks[part]
        joint = torch.cat([degradation[:, None].expand(-1, count, -1), blocks[None].expand(batch, -1, -1)], dim=-1)
        return getattr(self, f"{part}_fuse_mlp")(joint).reshape(batch, count, rank, rank)

    def release_state(self) -> dict:
        """The conditioner's entries of s3diff.pkl, in the release's layout."""
        state = {f"state_dict_{part}_{mlp}": getattr(self, f"{part}_{mlp}").state_dict()
                 for mlp in ("de_mlp", "block_mlp", "fuse_mlp") for part in ("vae", "unet")}
        state["w"] = nn.Parameter(self.w.clone(), requires_grad=False)  # the release pickles a Parameter
        state["state_embeddings"] = {f"state_dict_{part}_block": getattr(self, f"{part}_block_embeddings").state_dict()
                                     for part in ("vae", "unet")}
        return state

    def load_release_state(self, weights: dict) -> None:
        state = {"w": weights["w"]}
        for key, value in weights.items():
            if key.startswith("state_dict_") and key.endswith("_mlp"):
                state.update({f"{key[len('state_dict_'):]}.{name}": tensor for name, tensor in value.items()})
        for part in ("vae", "unet"):
            embedding = weights["state_embeddings"][f"state_dict_{part}_block"]
            state.update({f"{part}_block_embeddings.{name}": tensor for name, tensor in embedding.items()})
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"degradation MLPs do not fit ranks {self.ranks}: {str(error).splitlines()[-1].strip()}") from None


def check_degradation(degradation) -> tuple[float | None, float | None]:
    """(blur, noise) with None for 'estimate this one'; each given score must lie in [0, 1]."""
    if degradation is None:
        return None, None
    try:
        blur, noise = degradation
    except (TypeError, ValueError):
        raise UsageError(f"degradation must be a pair (blur, noise), got {degradation!r}") from None
    checked = []
    for name, value in (("blur", blur), ("noise", noise)):
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UsageError(f"degradation {name} must be a number in [0, 1], got {value!r}") from None
            if not 0 <= value <= 1:  # also rejects NaN
                raise UsageError(f"degradation {name} {value} is outside [0, 1]")
        checked.append(value)
    return checked[0], checked[1]


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


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad right and bottom to a multiple of `multiple`, as released. A reflection must be shorter
    than the side, so small images are reflected repeatedly (1-pixel sides are replicated)."""
    while True:
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if not (pad_h or pad_w):
            return image
        if min(height, width) < 2:
            return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        image = F.pad(image, (0, min(pad_w, width - 1), 0, min(pad_h, height - 1)), mode="reflect")


def guided_noise(unet: nn.Module, latents: torch.Tensor, text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps at t=999 with classifier-free guidance. `text` is (2, 77, d) = [positive, negative]: both
    branches run in ONE batched UNet call, eps = neg + s * (pos - neg); or (1, 77, d): no guidance."""
    count = latents.shape[0]
    batch = torch.cat([latents] * len(text))
    context = text.repeat_interleave(count, dim=0)  # [positive] * count (+ [negative] * count)
    eps = unet(batch, TIMESTEP, encoder_hidden_states=context).sample
    if len(text) == 1:
        return eps
    positive, negative = eps.chunk(2)
    return negative + guidance_scale * (positive - negative)


def _checked_weights(path, weights: dict) -> None:
    missing = [key for key in WEIGHT_KEYS if key not in weights]
    if missing:
        raise WeightsError(f"{path}: s3diff weights without {', '.join(repr(k) for k in missing)} (incomplete file?)")


def _load_exact(model: nn.Module, state: dict, wanted: Callable[[str], bool], label: str) -> None:
    """load_lora_state, plus: every tensor in `state` must have found its place."""
    load_lora_state(model, state, wanted, label)
    names = {name for name, _ in model.named_parameters() if wanted(name)}
    unused = [key for key in state if key not in names]
    if unused:
        raise WeightsError(f"{label} has '{unused[0]}' (and {len(unused) - 1} more) that this base model "
                           "has no place for: the weights were made for another base model")


def attach_degradation_lora(backbone: Backbone, weights: dict) -> tuple[LoraModulation, LoraModulation]:
    """Add the release's adapters (peft alpha 8 => scaling 8/rank), copy the trained tensors in (conv_in is
    trained in full, not LoRA-wrapped) and return the (vae, unet) modulations."""
    try:
        vae = add_degradation_lora(backbone.vae, weights["vae_lora_target_modules"], weights["rank_vae"],
                                   VAE_ADAPTER, vae_block)
        unet = add_degradation_lora(backbone.unet, weights["unet_lora_target_modules"], weights["rank_unet"],
                                    UNET_ADAPTER, unet_block)
    except ValueError as error:  # peft: no module matched the targets
        raise WeightsError(f"its LoRA targets do not fit this base model ({first_line(error)})") from None
    _load_exact(backbone.unet, weights["state_dict_unet"], lambda n: "lora" in n or "conv_in" in n, "state_dict_unet")
    _load_exact(backbone.vae, weights["state_dict_vae"], lambda n: "lora" in n or "skip_conv" in n, "state_dict_vae")
    return vae, unet


def unet_release_state(unet: nn.Module) -> dict:
    """The UNet tensors s3diff.pkl stores: every LoRA tensor and the fully trained conv_in."""
    return {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k}


def vae_release_state(vae: nn.Module) -> dict:
    """The VAE tensors s3diff.pkl stores: the encoder's LoRA tensors."""
    return {k: v for k, v in vae.state_dict().items() if "lora" in k or "skip_conv" in k}


def write_release(out_file: str | Path, unet: nn.Module, vae: nn.Module, conditioner: DegradationConditioner) -> Path:
    """Write s3diff.pkl in the release's layout (ArcticHare105/S3Diff `S3Diff.save_model`) from a UNet and a
    VAE carrying the release's adapters and the degradation conditioner. The estimator (de_net.pth) is a
    separate file that the caller writes beside it."""
    out_file = Path(out_file)
    torch.save({
        "unet_lora_target_modules": UNET_TARGETS,
        "vae_lora_target_modules": VAE_TARGETS,
        "rank_unet": conditioner.ranks["unet"],
        "rank_vae": conditioner.ranks["vae"],
        "state_dict_unet": {k: v.detach().cpu().float() for k, v in unet_release_state(unet).items()},
        "state_dict_vae": {k: v.detach().cpu().float() for k, v in vae_release_state(vae).items()},
        **conditioner.release_state(),
    }, out_file)
    return out_file


class S3Diff(Upscaler):
    name = "s3diff"
    default_base = "sd-turbo"
    default_color_fix = "wavelet"
    weights_name = "s3diff.pkl"
    Knobs = S3DiffKnobs

    def __init__(self, backbone: Backbone, conditioner: DegradationConditioner, modulations, estimator: DEResNet,
                 sample_posterior: bool = False):
        self.backbone = backbone
        self.conditioner = conditioner.to(backbone.device)  # may be a trainer's, still training
        self.vae_modulation, self.unet_modulation = modulations
        # The estimator is small: it stays in float32 whatever the model's dtype.
        self.estimator = estimator.to(backbone.device)
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
        state = read_method_weights(weights, cls.name)
        _checked_weights(weights, state)
        estimator = load_de_net(Path(de_net) if de_net is not None else Path(weights).parent / "de_net.pth")
        conditioner = DegradationConditioner(state["rank_vae"], state["rank_unet"]).requires_grad_(False)
        backbone = load_backbone(base, device, dtype)
        try:
            conditioner.load_release_state(state)
            modulations = attach_degradation_lora(backbone, state)
        except WeightsError as error:
            raise WeightsError(f"{weights}: {error}") from None
        return cls(backbone, conditioner, modulations, estimator, sample_posterior=sample_posterior)

    @classmethod
    def write_random_weights(cls, base: Path, out_file: Path, seed: int = 0) -> None:
        """A random s3diff.pkl with the release's keys, targets, ranks and adapter names, and a random
        de_net.pth beside it."""
        backbone = load_backbone(base)
        generator = torch.Generator().manual_seed(seed)
        add_degradation_lora(backbone.vae, VAE_TARGETS, RANK_VAE, VAE_ADAPTER, vae_block)
        add_degradation_lora(backbone.unet, UNET_TARGETS, RANK_UNET, UNET_ADAPTER, unet_block)
        for state in (unet_release_state(backbone.unet), vae_release_state(backbone.vae)):
            for key, value in state.items():  # views of the parameters: perturbed in place
                # lora_B starts at zero in training; random here so the adapters visibly act.
                noise = torch.randn(value.shape, generator=generator)
                # The UNet's conv_in is fully trained (perturb the base); every other tensor is LoRA state.
                value.copy_(value + 0.01 * noise if key.startswith("conv_in.") else 0.05 * noise)
        conditioner = DegradationConditioner(RANK_VAE, RANK_UNET)
        for name, value in conditioner.state_dict().items():
            if "bias" in name:
                scale = 0.01
            elif "mlp" in name:  # keep activations O(1); C's entries ~ 1/sqrt(r) keep the LoRA path's size
                scale = 1 / math.sqrt(value.shape[1]) / (math.sqrt(math.isqrt(value.shape[0])) if "fuse" in name else 1)
            else:  # w and the block embeddings: standard normal, as initialised in the release
                scale = 1.0
            value.copy_(torch.randn(value.shape, generator=generator) * scale)
        write_release(out_file, backbone.unet, backbone.vae, conditioner)
        estimator = DEResNet()
        for name, value in estimator.state_dict().items():
            fan_in = value[0].numel() if value.dim() > 1 else 1
            # Small residual branches (as the release initialises them) keep the scores away from 0 and 1.
            scale = (0.1 if name.startswith("body") else 1.0) * math.sqrt(2 / fan_in)
            value.copy_(torch.randn(value.shape, generator=generator) * (scale if value.dim() > 1 else 0.01))
        torch.save(estimator.state_dict(), Path(out_file).parent / "de_net.pth")

    @classmethod
    def knob_names(cls):
        return S3DiffKnobs.names()

    def check_knobs(self, knobs: dict) -> None:
        super().check_knobs(knobs)
        self.call_knobs({name: value for name, value in knobs.items() if name not in TILING_KNOBS})

    def call_knobs(self, given: dict) -> S3DiffKnobs:
        """One call's knobs, checked; sample_posterior defaults to the load option."""
        return S3DiffKnobs.from_call(given, {"sample_posterior": self.sample_posterior})

    # -- degradation ------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_degradation(self, image) -> tuple[float, float]:
        """(blur, noise) in [0, 1] as the estimator sees the input image (before any resizing)."""
        lr = as_picture(image).to_tensor().to(self.device)
        blur, noise = self.estimator(lr)[0].tolist()
        return blur, noise

    def degradation_scores(self, picture: Picture, degradation=None) -> tuple[float, float]:
        """The user's (blur, noise), with the estimator's score wherever the user gave None."""
        blur, noise = check_degradation(degradation)
        if blur is None or noise is None:
            estimated = self.estimate_degradation(picture)
            blur = estimated[0] if blur is None else blur
            noise = estimated[1] if noise is None else noise
        return blur, noise

    def prepare_knobs(self, picture: Picture, knobs: dict) -> dict:
        """The degradation (blur, noise) is estimated on the input picture, before it is resized."""
        given = check_degradation(knobs.get("degradation"))
        scores = self.degradation_scores(picture, given)
        if knobs.get("show_degradation"):
            labels = ["given" if value is not None else "estimated" for value in given]
            print(f"{picture.name}: degradation blur {scores[0]:.4f} ({labels[0]}), noise {scores[1]:.4f} ({labels[1]})")
        return {**knobs, "degradation": scores}

    # -- restoration ------------------------------------------------------------------------------
    def preprocess(self, picture: Picture, scale: float) -> Prepared:
        """As inference_s3diff.py: the [0, 1] input upscaled by `scale`, bilinear (align_corners False)."""
        lr = picture.to_tensor()
        size = (round(lr.shape[-2] * scale), round(lr.shape[-1] * scale))
        upscaled = F.interpolate(lr, size=size, mode="bilinear", align_corners=False)
        return Prepared(upscaled, output_size(picture, scale))

    def denoiser(self, knobs: S3DiffKnobs):
        """The UNet step as `denoise(latent_tiles, condition_tiles) -> eps` for tiles of one image (the
        tiler's contract; S3Diff's condition is the latent itself, so condition_tiles is unused).
        `knobs.degradation` holds both scores.

        Guided: both branches in one UNet pass, eps = neg + s * (pos - neg). With s = 1 the negative
        branch is skipped."""
        guidance_scale = knobs.guidance_scale
        guided = guidance_scale != 1
        text = self.backbone.encode_prompt([knobs.prompt, knobs.negative_prompt] if guided else [knobs.prompt])
        scores = torch.tensor([knobs.degradation], dtype=torch.float32, device=self.device)
        matrices = self.conditioner.matrices("unet", scores).to(self.dtype)  # one image: shared by every tile
        unet, modulation = self.backbone.unet, self.unet_modulation

        def denoise(latents: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
            with modulation.use(matrices):
                return guided_noise(unet, latents.to(self.dtype), text, guidance_scale)

        return denoise

    @torch.no_grad()
    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                **given) -> torch.Tensor:
        vae = self.backbone.vae
        knobs = self.call_knobs(given)
        degradation, sample = knobs.degradation, knobs.sample_posterior
        if degradation is None or None in degradation:
            raise UsageError("restore needs both degradation scores (blur, noise); upscale() estimates them")
        denoise = self.denoiser(knobs)
        height, width = lr.shape[-2:]
        image = pad_to_multiple((lr * 2 - 1).clamp(-1, 1), PAD_MULTIPLE)
        scores = torch.tensor([degradation], dtype=torch.float32, device=self.device)
        with self.vae_modulation.use(self.conditioner.matrices("vae", scores).to(self.dtype)):
            posterior = vae_encode(vae, image.to(self.dtype), tiling)
        latent = (posterior.sample(generator) if sample else posterior.mode()) * vae.config.scaling_factor
        eps = tiling.aggregate(denoise, latent, None, TILE_SIZE, self.backbone.unet)
        # One step from t=999 straight to x0 (what the release's one-step DDPM scheduler returns).
        x0 = x0_from_eps(latent.float(), eps.float(), self.alpha_bar)
        decoded = vae_decode(vae, (x0 / vae.config.scaling_factor).to(self.dtype), tiling).clamp(-1, 1)
        return decoded[..., :height, :width].float().mul_(0.5).add_(0.5)
