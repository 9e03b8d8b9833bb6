"""StableSR: SD 2.1 UNet with SFT layers driven by a time-aware encoder of the LR latent, multi-step
sampling, and a CFW decoder that trades fidelity (w -> 1) for realism (w -> 0).

Release: IceClear/StableSR (`stablesr_000117.ckpt`, `stablesr_turbo.ckpt`, `stablesr_768v_000139.ckpt`,
`vqgan_cfw_00011.ckpt`, Lightning checkpoints in LDM key names). Facts: ../shared/METHODS.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffsr import knobs
from diffsr.backbone import Backbone, load_backbone
from diffsr.checkpoints import read_weights
from diffsr.checkpoints import ldm
from diffsr.errors import BaseModelError, UsageError, WeightsError
from diffsr.images import Picture
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.nets.stablesr_nets import SFT_HIDDEN, CFWAutoencoder, SFTUNet, TimeAwareEncoder, add_sft
from diffsr.tiling import TilingOptions
from diffsr.samplers import (PREDICTIONS, Schedule, guide, q_sample, randn, release_ddim_alphas, sample_ddim, sample_ddpm,
                             space_timesteps)

CFW_NAME = "vqgan_cfw_00011.ckpt"
SAMPLERS = ("ddpm", "ddim")
STARTS = ("lr", "noise")
PAD_MULTIPLE = 32  # the release reflect-pads the upscaled LR to a multiple of 32 px (see release_padding)
NEGATIVE_PROMPT = "3d, cartoon, anime, sketches, (worst quality:2), (low quality:2)"  # the DDIM script's
START_TIMESTEP = 999
DEFAULT_START = {"ddpm": "lr", "ddim": "noise"}  # as the release's canvas_tile DDPM and DDIM scripts


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


# ------------------------------------------------------------------------------- checkpoint reading
def read_stablesr_parts(path: str | Path, unet_config: dict, vae_config: dict, norm_groups: int) -> dict:
    """The parts a StableSR file holds, in the diffusers layout: any of 'unet', 'encoder' (+ 'encoder_config'),
    'vae', 'fusion'. Reads the release's Lightning .ckpt (LDM names) or a file written by `diffsr convert`."""
    raw = read_weights(path)
    state = raw.get("state_dict", raw)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: 'state_dict' is not a dict of tensors")
    if any(k.startswith(("unet.", "vae.", "fusion.")) for k in state):  # already converted
        parts = {name: ldm.strip_prefix(state, name + ".") for name in ("unet", "encoder", "vae", "fusion")}
        parts = {k: v for k, v in parts.items() if v}
        if "encoder" in parts:
            parts["encoder_config"] = encoder_config_from_state(parts["encoder"], norm_groups)
        return parts
    parts = {}
    try:
        unet_state = ldm.strip_prefix(state, ldm.UNET_PREFIX)
        if unet_state:
            parts["unet"] = ldm.unet_from_ldm(state, unet_config)
        encoder_state = ldm.strip_prefix(state, ldm.ENCODER_PREFIX)
        if encoder_state:
            config = ldm.encoder_config_from_ldm(encoder_state, norm_groups)
            parts["encoder"], parts["encoder_config"] = ldm.encoder_from_ldm(encoder_state, config), config
        # The CFW file is a bare autoencoder; the main file nests one under first_stage_model.
        vae_state = ldm.strip_prefix(state, ldm.VAE_PREFIX) or {
            k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
        if vae_state:
            parts["vae"], fusion = ldm.vae_from_ldm(vae_state, vae_config)
            if fusion:
                parts["fusion"] = fusion
    except (KeyError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{path}: not a StableSR checkpoint this base can hold ({error})") from None
    return parts


def encoder_config_from_state(state: dict, norm_groups: int, num_heads: int = 4) -> dict:
    """TimeAwareEncoder arguments from its own (converted) tensor shapes."""
    model_channels, in_channels = state["conv_in.weight"].shape[:2]
    maps = sorted({int(k.split(".")[1]) for k in state if k.startswith("fea_tran.")})
    widths = [state[f"fea_tran.{i}.norm1.weight"].shape[0] for i in maps]
    return dict(in_channels=in_channels, model_channels=model_channels,
                out_channels=state["fea_tran.0.conv2.weight"].shape[0],
                channel_mult=tuple(w // model_channels for w in widths),
                num_res_blocks=len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")}),
                attention_levels=tuple(sorted({int(k.split(".")[1]) for k in state if k.startswith("down_blocks.") and ".attentions." in k})),
                num_heads=num_heads, norm_groups=norm_groups)


def _load_strict(module: torch.nn.Module, state: dict, path, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise WeightsError(f"{path}: the {what} lacks '{missing[0]}' ({len(missing)} tensors missing)")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise WeightsError(f"{path}: {what} tensor '{key}' has shape {tuple(state[key].shape)}, the base model "
                               f"needs {tuple(value.shape)} (weights made for another base?)")
    module.load_state_dict({k: state[k] for k in own})


def sft_shapes(unet_state: dict) -> tuple[int, int]:
    """(condition channels, hidden width) of the SFT layers in a converted UNet state."""
    weight = next((v for k, v in unet_state.items() if k.endswith(".sft.mlp_shared.0.weight")), None)
    if weight is None:
        raise WeightsError("its UNet has no SFT (spade) layers: a plain Stable Diffusion UNet, not StableSR's")
    return weight.shape[1], weight.shape[0]


def ldm_schedule_buffers(alphas_cumprod: torch.Tensor) -> dict:
    """The diffusion-schedule buffers an LDM Lightning checkpoint stores beside the weights."""
    abar = alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    variance = betas * (1 - abar_prev) / (1 - abar)
    buffers = {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
               "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
               "log_one_minus_alphas_cumprod": (1 - abar).log(), "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
               "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(), "posterior_variance": variance,
               "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
               "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
               "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)}
    return {k: v.float() for k, v in buffers.items()}


# ------------------------------------------------------------------------------- checkpoint writing
def save_model_checkpoint(out_file: Path, unet: torch.nn.Module, encoder: TimeAwareEncoder, vae: torch.nn.Module,
                          alphas_cumprod: torch.Tensor, global_step: int = 0) -> Path:
    """The release's main Lightning checkpoint (LDM names): `unet` (a diffusers UNet with SFT layers),
    the time-aware encoder, the first-stage VAE and the schedule buffers."""
    tensors = lambda module: {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}  # noqa: E731
    state = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(tensors(unet), unet.config.layers_per_block).items()}
    state.update({ldm.ENCODER_PREFIX + k: v for k, v in ldm.encoder_to_ldm(tensors(encoder), encoder.config).items()})
    levels = len(vae.config.block_out_channels)
    state.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(tensors(vae), {}, levels).items()})
    state.update(ldm_schedule_buffers(alphas_cumprod))
    torch.save({"state_dict": state, "global_step": global_step, "epoch": 0}, out_file)
    return Path(out_file)


def save_cfw_checkpoint(out_file: Path, vae: torch.nn.Module, fusion: torch.nn.Module,
                        discriminator: torch.nn.Module | None = None, global_step: int = 0) -> Path:
    """The release's CFW autoencoder checkpoint (vqgan_cfw_00011.ckpt): the VAE with its
    `decoder.fusion_layer_*`, and the training loss's tensors (`loss.*`) as the release's file has them."""
    tensors = lambda module: {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}  # noqa: E731
    state = ldm.vae_to_ldm(tensors(vae), tensors(fusion), len(vae.config.block_out_channels))
    state["loss.logvar"] = torch.zeros(())
    if discriminator is not None:
        state.update({f"loss.discriminator.{k}": v for k, v in tensors(discriminator).items()})
    torch.save({"state_dict": state, "global_step": global_step, "epoch": 0}, out_file)
    return Path(out_file)


def release_padding(height: int, width: int) -> tuple[int, int]:
    """(bottom, right) reflect padding of the release's scripts: none when both sides are multiples of 32, else
    each side up to the next multiple of 32 *above* it, so a side that already is one grows by 32 too."""
    if height % PAD_MULTIPLE == 0 and width % PAD_MULTIPLE == 0:
        return 0, 0
    return PAD_MULTIPLE - height % PAD_MULTIPLE, PAD_MULTIPLE - width % PAD_MULTIPLE


# ------------------------------------------------------------------------------------------ method
class StableSR(Upscaler):
    name = "stablesr"
    default_base = "sd21-base"
    default_color_fix = "adain"
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

    # -- building --------------------------------------------------------------------------------
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
        if "768v" in weights.name and prediction != "v_prediction":
            raise WeightsError(f"{weights}: a v-prediction checkpoint (768v), but the base model's scheduler predicts "
                               f"'{prediction}': use base sd21-768v or prediction_type='v_prediction'")
        groups = backbone.unet.config.norm_num_groups
        parts = read_stablesr_parts(weights, backbone.unet.config, backbone.vae.config, groups)
        for needed in ("unet", "encoder"):
            if needed not in parts:
                raise WeightsError(f"{weights}: no {needed} weights: not a StableSR model checkpoint "
                                   f"(the CFW autoencoder file goes to cfw_weights / --cfw-weights)")
        try:
            cond_channels, hidden = sft_shapes(parts["unet"])
        except WeightsError as error:
            raise WeightsError(f"{weights}: {error}") from None
        unet = SFTUNet(backbone.unet, cond_channels, hidden)
        _load_strict(backbone.unet, parts["unet"], weights, "UNet")
        encoder = TimeAwareEncoder(**parts["encoder_config"])
        _load_strict(encoder, parts["encoder"], weights, "time-aware encoder")

        # One autoencoder serves encoding and decoding: the CFW file's when there is one (the release trained
        # only its fusion layers, so its encoder/decoder are the main file's first stage, the SD 2.1 VAE).
        cfw_path = Path(cfw_weights) if cfw_weights else cls.find_cfw(weights)
        vae_parts = parts if cfw_path is None else read_stablesr_parts(cfw_path, backbone.unet.config,
                                                                         backbone.vae.config, groups)
        if cfw_path is not None and "fusion" not in vae_parts:
            raise WeightsError(f"{cfw_path}: has no CFW fusion layers (decoder.fusion_layer_*): "
                               f"not a StableSR CFW autoencoder such as {CFW_NAME}")
        if cfw_path is None:
            warnings.warn(f"no {CFW_NAME} beside {weights.name} and no cfw_weights given: decoding with the plain "
                          "VAE decoder (fidelity has no effect)", stacklevel=2)
        autoencoder = CFWAutoencoder(backbone.vae, with_fusion="fusion" in vae_parts)
        if "vae" in vae_parts:
            _load_strict(backbone.vae, vae_parts["vae"], cfw_path or weights, "autoencoder")
        if "fusion" in vae_parts:
            _load_strict(autoencoder.fusion, vae_parts["fusion"], cfw_path, "CFW fusion layers")
        for module in (unet, encoder, autoencoder):  # the new SFT/encoder/fusion layers were built in float32
            module.requires_grad_(False).eval().to(device=backbone.device, dtype=backbone.dtype)
        defaults = {"steps": 4} if "turbo" in weights.name else {}
        return cls(backbone, unet, encoder, autoencoder, prediction, defaults, process_size)

    @classmethod
    def convert_weights(cls, weights: Path, base: str | Path, out_file: Path) -> None:
        """Write a release .ckpt (model or CFW autoencoder) in the diffusers layout as safetensors
        (`unet.*` with `.sft.` layers, `encoder.*`, `vae.*`, `fusion.*`); `load` reads either."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from safetensors.torch import save_file

        from diffsr.backbone import quiet_loading

        try:
            with quiet_loading():
                unet_config = UNet2DConditionModel.load_config(str(base), subfolder="unet")
                vae_config = AutoencoderKL.load_config(str(base), subfolder="vae")
        except (OSError, ValueError) as error:
            raise BaseModelError(f"{base}: cannot read the base model's UNet/VAE configs ({error})") from None
        parts = read_stablesr_parts(weights, unet_config, vae_config, unet_config["norm_num_groups"])
        tensors = {f"{part}.{key}": value.detach().clone().contiguous()
                   for part in ("unet", "encoder", "vae", "fusion") for key, value in parts.get(part, {}).items()}
        if not tensors:
            raise WeightsError(f"{weights}: holds no StableSR weights")
        save_file(tensors, str(out_file), metadata={"format": "pt", "source": Path(weights).name})

    @staticmethod
    def find_cfw(weights: Path) -> Path | None:
        for name in (CFW_NAME, Path(CFW_NAME).with_suffix(".safetensors").name):
            if (weights.parent / name).is_file():
                return weights.parent / name
        return None

    @classmethod
    def write_random_weights(cls, base: Path, out_file: Path, seed: int = 0) -> None:
        """A random Lightning checkpoint pair in the release's LDM key names, shaped for `base`:
        `out_file` (UNet with SFT, time-aware encoder, first-stage VAE) and vqgan_cfw_00011.ckpt beside it."""
        backbone = load_backbone(base)
        unet_config, vae = backbone.unet.config, backbone.vae
        channels = unet_config.block_out_channels[0]
        encoder_config = dict(in_channels=4, model_channels=channels, out_channels=channels, channel_mult=(1, 1, 2, 2),
                              num_res_blocks=2, attention_levels=(0, 1, 2), num_heads=4,
                              norm_groups=unet_config.norm_num_groups)
        generator = torch.Generator().manual_seed(seed)
        add_sft(backbone.unet, channels, SFT_HIDDEN)
        encoder = TimeAwareEncoder(**encoder_config)
        autoencoder = CFWAutoencoder(vae)

        def randomize(state: dict, only=lambda k: True) -> dict:
            # Small random values so every layer acts but activations stay bounded through the stack.
            return {k: (torch.randn(v.shape, generator=generator) * 0.05 if only(k) else v).contiguous()
                    for k, v in state.items()}

        unet_state = randomize(backbone.unet.state_dict(), lambda k: ".sft." in k)
        encoder_state = randomize(encoder.state_dict())
        fusion_state = randomize(autoencoder.fusion.state_dict())
        for state in (unet_state, encoder_state, fusion_state):  # GroupNorm scales near 1, as trained
            for key in state:
                if ("norm" in key) and key.endswith("weight") and state[key].ndim == 1:
                    state[key] = state[key] + 1
        backbone.unet.load_state_dict(unet_state)
        encoder.load_state_dict(encoder_state)
        autoencoder.fusion.load_state_dict(fusion_state)
        save_model_checkpoint(out_file, backbone.unet, encoder, vae, backbone.alphas_cumprod)
        save_cfw_checkpoint(out_file.parent / CFW_NAME, vae, autoencoder.fusion)

    # -- running ---------------------------------------------------------------------------------
    @classmethod
    def knob_names(cls):
        return cls.Knobs.names()

    def settings(self, given: dict) -> StableSRKnobs:
        """The knobs of one call (the tiling ones aside), checked: given values over the variant's defaults."""
        return self.Knobs.from_call({k: v for k, v in given.items() if k in self.Knobs.names()}, self.defaults)

    def check_knobs(self, knobs: dict) -> None:
        super().check_knobs(knobs)
        self.settings(knobs)

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
        """One denoiser call: time-aware encoder on the LR latent at t, then the SFT UNet."""
        if condition.shape[0] != latent.shape[0]:  # guidance stacks [negative; positive] copies of the latent
            condition = condition.repeat(latent.shape[0] // condition.shape[0], 1, 1, 1)
        maps = self.encoder(condition.to(self.dtype), timestep)
        return self.unet(latent.to(self.dtype), timestep, text, maps)

    def sample(self, condition: torch.Tensor, text: torch.Tensor, generator: torch.Generator, steps: int,
               sampler: str = "ddpm", negative: torch.Tensor | None = None, guidance_scale: float = 1.0,
               eta: float = 0.0, start: str = "lr", tiler=None) -> torch.Tensor:
        """Denoise from t=999 to a clean latent, conditioned on the (scaled) LR latent `condition`.

        Random draws in the release's order (after the encoder's posterior sample): the noise for the LR start,
        drawn even when starting from pure noise (the scripts compute that start and drop it), then the pure
        noise start, then the sampler's per-step noise.

        `tiler(denoise, latent, condition) -> prediction`, when given, runs `denoise(latent_tiles,
        condition_tiles)` over tiles and merges the predictions (diffsr.tiling.aggregate); guidance is
        applied per tile, which is the same as after merging since the merge is linear."""
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

    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                **given) -> torch.Tensor:
        knobs = self.settings(given)
        prompt, negative_prompt, steps, sampler = knobs.prompt, knobs.negative_prompt, knobs.steps, knobs.sampler
        guidance_scale, fidelity, eta, start = knobs.guidance_scale, knobs.fidelity, knobs.eta, knobs.start_latent
        height, width = lr.shape[-2:]
        image = lr * 2 - 1
        pad_h, pad_w = release_padding(height, width)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
        dist, features = self.autoencoder.encode(image.to(self.dtype), tiling)
        condition = dist.sample(generator) * self.scaling_factor
        backbone = self.backbone
        text = backbone.encode_prompt([prompt])
        negative = None
        if guidance_scale != 1:
            negative = backbone.encode_prompt([negative_prompt])
        tile = self.process_size // 8  # the release's latent tile: --input_size / 8 (64, or 96 for the 768-v model)

        def tiler(denoise, latent, condition_latent):
            return tiling.aggregate(denoise, latent, condition_latent, tile, backbone.unet)

        latent = self.sample(condition, text, generator, steps, sampler, negative, guidance_scale, eta, start,
                             tiler=tiler)
        decoded = self.autoencoder.decode((latent / self.scaling_factor).to(self.dtype), features, fidelity, tiling)
        return decoded[..., :height, :width].float().clamp_(-1, 1).add_(1).div_(2)
