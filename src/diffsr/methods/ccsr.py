"""CCSR: truncated diffusion with a ControlNet on SD 2.1-base and a fine-tuned VAE decoder.

Release: csslc/CCSR. v2 (branch CCSR-v2.0, diffusers): weights are a folder with `controlnet/` (a
ControlNet whose condition is the LR image's VAE latent through one conv, `condition_conv_in`) and
`vae/` (the stage-2 VAE). v1 (branch CCSR-v1.0, LDM): `real-world_ccsr.ckpt`, converted on load to the
same modules. Facts: ../shared/METHODS.md; paper: Sun et al., "Improving the Stability and Efficiency
of Diffusion Models for Content Consistent Super-Resolution".
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffsr import knobs as knobs_module
from diffsr.backbone import Backbone, load_backbone, quiet_loading, resolve_dtype
from diffsr.errors import UsageError, WeightsError, first_line
from diffsr.images import Picture, resize
from diffsr.knobs import knob
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.nets.ccsr_controlnet import controlnet_class, controlnet_from_unet
from diffsr.samplers import TruncatedSchedule, q_sample, randn, space_timesteps, truncated_sample
from diffsr.tiling import TilingOptions, vae_decode, vae_encode

START_T = 999  # both releases start from the LR latent (v2) or noise (v1) at t = 999
PROCESS_SIZE = 512
V2_PROMPT = "clean, high-resolution, 8k"
V2_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
# Release defaults: v2 test_ccsr_tile.py (one step), v1 inference_ccsr.py.
V2_DEFAULTS = dict(steps=1, t_max=0.6666, t_min=0.0, guidance_scale=1.0, prompt=V2_PROMPT, negative_prompt=V2_NEGATIVE_PROMPT)
V1_DEFAULTS = dict(steps=45, t_max=0.6667, t_min=0.3333, guidance_scale=1.0, prompt="", negative_prompt="")


# -- knobs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Knobs(knobs_module.Knobs):
    """CCSR's per-call settings (paper: T steps, truncation t_max > t_min as fractions of T). None takes the
    variant's release default (V1_DEFAULTS / V2_DEFAULTS; sample_posterior: the load option)."""

    prompt: str | None = knob(None, "text prompt (v1: empty; v2: 'clean, high-resolution, 8k')", kind=str)
    negative_prompt: str | None = knob(None, "negative prompt for guidance (v1: empty; v2: the release's)", kind=str)
    steps: int | None = knob(None, "diffusion steps T (v1: 45; v2: 1, the one-step mode)", low=1, kind=int)
    t_max: float | None = knob(None, "where the chain starts, a fraction of T (v1: 0.6667; v2: 0.6666)", low=0, high=1,
                               kind=float)
    t_min: float | None = knob(None, "where it stops, a fraction of T (v1: 0.3333; v2: 0)", low=0, high=1, kind=float)
    guidance_scale: float | None = knob(None, "classifier-free guidance (1: none; v2 guides only above 1)", low=0,
                                        low_open=True, kind=float)
    sample_posterior: bool | None = knob(None, "v2: sample the LR latent's VAE posterior (else its mean)", kind=bool)

    def check(self) -> None:
        """The chain must exist: t_min below t_max, and with several steps at least one DDPM step between them."""
        steps, t_max, t_min = self.steps, self.t_max, self.t_min
        if t_max is None or t_min is None:
            return
        if t_min >= t_max:
            raise UsageError(f"t_min ({t_min}) must be smaller than t_max ({t_max})")
        if steps is not None and steps > 1 and round(steps * t_max) - round(steps * t_min) < 1:
            raise UsageError(f"steps={steps} with t_max={t_max}, t_min={t_min} leaves no denoising step: "
                             f"round(steps*t_max)={round(steps * t_max)} must exceed "
                             f"round(steps*t_min)={round(steps * t_min)}")


# -- schedules -----------------------------------------------------------------------------------

def v2_schedule(scheduler_config: dict, steps: int, t_max: float, t_min: float) -> TruncatedSchedule:
    """The v2 pipeline's chain on diffusers' DDPM timesteps ('leading' spacing of the base's config).

    steps == 1 is the one-step mode (x0 at t = 999). Otherwise the last round(steps*t_max) timesteps
    are kept, the first of them is the re-noising level, and the last round(steps*t_min) are dropped;
    t_max == 1 skips the first x0 estimate (the chain starts from the noised LR latent)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    alpha_bar = scheduler.alphas_cumprod
    if steps == 1:
        return TruncatedSchedule(START_T, alpha_bar[START_T].item(), None, [])
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    kept = timesteps[-round(len(timesteps) * t_max):]
    dropped = round(len(timesteps) * t_min) if t_min > 0 else 0
    chain = kept[:len(kept) - dropped]
    steps_list = []
    for t in chain:
        prev = int(scheduler.previous_timestep(t))
        steps_list.append((t, alpha_bar[t].item(), alpha_bar[prev].item() if prev >= 0 else 1.0))
    start = None if t_max == 1 else START_T
    return TruncatedSchedule(start, alpha_bar[START_T].item(), alpha_bar[kept[0]].item(), steps_list)


def ldm_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """LDM's float64 'linear' schedule (sqrt-linear betas), as the v1 sampler computes it."""
    betas = torch.linspace(scheduler_config["beta_start"] ** 0.5, scheduler_config["beta_end"] ** 0.5,
                           scheduler_config["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def v1_schedule(scheduler_config: dict, steps: int, t_max: float, t_min: float) -> TruncatedSchedule:
    """The v1 sampler's chain (model/q_sampler.py sample_ccsr) on `steps` re-spaced timesteps.

    The x0 estimate at index N-1 (t = 999) is re-noised to index round((N-1)*t_max) (float32 product,
    as the release computes it); DDPM steps then run from index round(N*t_max)-1 down to round(N*t_min).
    With t_min = 0 the release's slice is empty and it fails; here the steps go down to index 0.
    steps == 1 is the one-step mode (x0 at t = 999), which the v1 release does not offer."""
    alpha_bar = ldm_alphas_cumprod(scheduler_config)
    if steps == 1:
        return TruncatedSchedule(START_T, alpha_bar[START_T].item(), None, [])
    timesteps = space_timesteps(len(alpha_bar), steps)
    spaced = alpha_bar[timesteps].tolist()
    renoise_index = int(torch.round(torch.tensor(float(steps - 1)) * t_max))
    first, last = round(steps * t_max), round(steps * t_min)
    chain = [(timesteps[i], spaced[i], spaced[i - 1] if i > 0 else 1.0) for i in range(first - 1, last - 1, -1)]
    return TruncatedSchedule(timesteps[-1], spaced[-1], spaced[renoise_index], chain)


# -- the method ----------------------------------------------------------------------------------

def _draws(generator: torch.Generator):
    """A noise sampler: standard normal like x from `generator`."""
    return lambda x: randn(x.shape, generator, x)


class CCSR(Upscaler):
    name = "ccsr"
    default_base = "sd21-base"
    default_color_fix = "adain"
    weights_name = "CCSR-v2 folder (controlnet/ + vae/) or real-world_ccsr.ckpt"

    def __init__(self, backbone: Backbone, controlnet: nn.Module, version: int, condition_vae=None,
                 sample_posterior: bool = True, process_size: int = PROCESS_SIZE):
        self.backbone = backbone
        self.controlnet = controlnet
        self.version = version
        # v1 encodes the condition with its own encoder copy (`cond_encoder`); v2 with the stage-2 VAE.
        self.condition_vae = condition_vae or backbone.vae
        self.sample_posterior = sample_posterior
        self.process_size = process_size
        self.defaults = {**(V2_DEFAULTS if version == 2 else V1_DEFAULTS), "sample_posterior": sample_posterior}
        # v1's inference_ccsr.py brings the sampled image (truncated to 8 bits) to the output size with Lanczos
        self.output_resample = "lanczos" if version == 1 else "bicubic"
        # v1's inference_ccsr.py colour-fixes the decoded image as it is and clamps after the fix
        self.clamp_before_color_fix = version == 2
        # ControlNet + UNet calls since loading (v2 batches a CFG pair into one call, v1 makes two, as released)
        self.evaluations = 0

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, base, weights, device="cpu", dtype="float32", sample_posterior: bool = True,
             process_size: int = PROCESS_SIZE) -> "CCSR":
        if weights is None:
            raise UsageError("ccsr needs its weights: pass the CCSR-v2 folder (with controlnet/ and vae/) "
                             "or real-world_ccsr.ckpt (--weights)")
        weights = Path(weights)
        if not weights.exists():
            raise WeightsError(f"{weights}: weights not found")
        if weights.is_dir():
            controlnet, vae = load_v2(weights, resolve_dtype(dtype))
            backbone = load_backbone(base, device, dtype, vae=vae)
            condition_vae, version = None, 2
        else:
            from diffsr.methods.ccsr_v1 import load_v1

            backbone = load_backbone(base, device, dtype)
            controlnet, condition_vae = load_v1(weights, backbone)
            version = 1
        for module in (controlnet, backbone.vae, condition_vae):
            if module is not None:
                module.requires_grad_(False).eval().to(device=backbone.device)
        return cls(backbone, controlnet, version, condition_vae, sample_posterior=sample_posterior,
                   process_size=process_size)

    @classmethod
    def write_random_weights(cls, base: Path, out_file: Path, seed: int = 0) -> None:
        """Random CCSR weights for `base`: a `.ckpt` name gives the v1 LDM checkpoint, anything else the
        v2 release folder (controlnet/ + vae/)."""
        if Path(out_file).suffix == ".ckpt":
            from diffsr.methods.ccsr_v1 import write_random_v1

            write_random_v1(Path(base), Path(out_file), seed)
        else:
            write_random_v2(Path(base), Path(out_file), seed)

    def settings(self, given: dict) -> Knobs:
        """The call's knobs (tiling ones left out) over this variant's release defaults, checked."""
        return Knobs.from_call({k: v for k, v in given.items() if k in Knobs.names()}, self.defaults)

    def check_knobs(self, knobs: dict) -> None:
        """Unknown names, then values: the chain's settings and the guidance scale, before any work."""
        super().check_knobs(knobs)
        self.settings(knobs)

    @classmethod
    def knob_names(cls):
        return Knobs.names()

    def denoiser_passes(self, knobs: dict) -> int:
        """The chain's evaluations; v1 guides each with two separate calls (v2 batches the pair)."""
        settings = self.settings(knobs)
        evaluations = self.schedule(settings.steps, settings.t_max, settings.t_min).evaluations
        return evaluations * (2 if self.version == 1 and settings.guidance_scale != 1 else 1)

    # -- the flow --------------------------------------------------------------------------------
    def preprocess(self, picture: Picture, scale: float) -> Prepared:
        """v2 (test_ccsr_tile.py): enlarge inputs whose short side is below process_size // scale, resize
        by `scale`, then down to a multiple of 8 (PIL bicubic throughout). v1 (inference_ccsr.py): resize
        by `scale` (size rounded up), enlarge to a short side of 512, then to a multiple of 64 (Lanczos)."""
        rgb = picture.rgb
        width, height = picture.size
        if self.version == 2:
            short_side = self.process_size // scale
            if width < short_side or height < short_side:
                grow = short_side / min(width, height)
                width, height = round(grow * width), round(grow * height)
                rgb = resize(rgb, (width, height), "bicubic")
            width, height = round(width * scale), round(height * scale)
            rgb = resize(rgb, (width, height), "bicubic")
            rgb = resize(rgb, (width // 8 * 8, height // 8 * 8), "bicubic")
        else:
            width, height = math.ceil(width * scale), math.ceil(height * scale)
            rgb = resize(rgb, (width, height), "bicubic")
            if min(width, height) < self.process_size:
                grow = self.process_size / min(width, height)
                width, height = math.ceil(width * grow), math.ceil(height * grow)
                rgb = resize(rgb, (width, height), "bicubic")
            rgb = resize(rgb, (width // 64 * 64, height // 64 * 64), "lanczos")
        return Prepared(Picture(rgb).to_tensor(), output_size(picture, scale))

    def denoiser_tile(self, latent: torch.Tensor, tiling: TilingOptions) -> int:
        """The latent tile for this image. Both releases denoise the whole latent (their scripts tile only on
        request), so does diffsr unless `tile_size` is given or the whole latent does not fit the memory budget;
        that case is said once."""
        height, width = latent.shape[-2:]
        whole = -(-max(height, width) // 8) * 8
        tile = tiling.denoiser_tile(whole, self.backbone.unet, latent.device, self.dtype)
        if tiling.tile_size is None and height * width > tile * tile:
            warnings.warn(f"ccsr: a {height}x{width} latent does not fit the memory budget in one pass: denoising in "
                          f"{tile}x{tile} tiles (the release samples it whole)", stacklevel=2)
        return tile

    def quantize(self, image: torch.Tensor, dtype) -> np.ndarray:
        """v1 to 8 bits as inference_ccsr.py, truncating ((x * 255).astype(np.uint8)); its Lanczos resize follows."""
        if self.version == 1 and dtype == np.uint8:
            return (image[0].detach().float().cpu().clamp(0, 1) * 255).permute(1, 2, 0).numpy().astype(np.uint8)
        return super().quantize(image, dtype)

    def tiled_denoise(self, latent: torch.Tensor, condition: torch.Tensor, text: torch.Tensor, t: int,
                      tiling: TilingOptions, tile: int) -> torch.Tensor:
        """`denoise` over latent tiles (diffsr.tiling), one call when the latent fits in a tile."""
        def denoise(tiles, condition_tiles):
            rows = tiles.shape[0] // text.shape[0]  # tiles come stacked, each with the latent's batch rows
            return self.denoise(tiles, condition_tiles, text.repeat(rows, 1, 1), t)

        return tiling.aggregate(denoise, latent, condition, tile, self.backbone.unet)

    def denoise(self, latent: torch.Tensor, condition: torch.Tensor, text: torch.Tensor, t: int) -> torch.Tensor:
        """One network evaluation: ControlNet on (latent, condition latent), then the UNet with its
        residuals -> eps. Batched inputs of the same size; the unit a latent tiler wraps."""
        self.evaluations += 1
        unet, dtype = self.backbone.unet, self.dtype
        timestep = torch.full((latent.shape[0],), t, device=latent.device, dtype=torch.long)
        latent, condition = latent.to(dtype), condition.to(dtype)
        down, mid = self.controlnet(latent, timestep, text, condition)
        return unet(latent, timestep, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample

    def schedule(self, steps: int, t_max: float, t_min: float) -> TruncatedSchedule:
        build = v2_schedule if self.version == 2 else v1_schedule
        return build(self.backbone.scheduler_config, steps, t_max, t_min)

    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                **knobs) -> torch.Tensor:
        latent = self.sample_latent(lr, generator, tiling, **knobs)
        vae = self.backbone.vae
        image = vae_decode(vae, (latent / vae.config.scaling_factor).to(self.dtype), tiling)
        image = image.float().div_(2).add_(0.5)
        return image.clamp_(0, 1) if self.clamp_before_color_fix else image

    def sample_latent(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                      **knobs) -> torch.Tensor:
        """The restored (scaled) latent of one image, before the VAE decoder (stage-2 training decodes it)."""
        self.check_knobs(knobs)
        settings = self.settings(knobs)
        schedule = self.schedule(settings.steps, settings.t_max, settings.t_min)
        run = self._restore_v2 if self.version == 2 else self._restore_v1
        return run(lr, generator, schedule, settings, tiling)

    def _texts(self, knobs: Knobs, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompts = [knobs.prompt] + ([knobs.negative_prompt] if guided else [])
        embeds = self.backbone.encode_prompt(prompts)
        return embeds[:1], (embeds[1:] if guided else None)

    def _restore_v2(self, lr, generator, schedule, knobs, tiling):
        """As the v2 pipeline: with one seed, `generator` draws the start noise and the DDPM step noise
        (the pipeline's generator) and a second generator with the same seed draws the VAE posterior
        sample and the re-noising noise (the release's global RNG after set_seed)."""
        scale = knobs.guidance_scale
        guided = scale > 1  # the release's test: CFG only above 1
        second = torch.Generator(device=generator.device).manual_seed(generator.initial_seed())
        text, negative = self._texts(knobs, guided)
        vae = self.condition_vae
        start_noise_shape = (1, vae.config.latent_channels, lr.shape[-2] // 8, lr.shape[-1] // 8)
        start_noise = randn(start_noise_shape, generator, lr)
        posterior = vae_encode(vae, (lr * 2 - 1).to(self.dtype), tiling)
        if knobs.sample_posterior:
            # The release encodes the image once per CFG branch and samples each posterior separately.
            draws = randn((2 if guided else 1, *posterior.mean.shape[1:]), second, lr)
            condition = posterior.mean.float() + posterior.std.float() * draws
        else:
            condition = posterior.mean.float().expand(2 if guided else 1, -1, -1, -1)
        condition = condition * vae.config.scaling_factor
        start = q_sample(condition[:1], start_noise, schedule.start_alpha_bar)
        tile = self.denoiser_tile(start, tiling)
        # The release draws its start timestep, and the first estimate's, with torch.randint(999, 1000)
        # from the same RNG: always 999, but the draws advance the RNG before the re-noising noise.
        for _ in range(1 + (schedule.start_t is not None)):
            torch.randint(START_T, START_T + 1, (1,), generator=second, device=second.device)

        def model(x, t, cfg):
            if not guided:
                return self.tiled_denoise(x, condition[:1], text, t, tiling, tile)
            if not cfg:
                # The release's first estimate takes the first half of the CFG batch: the NEGATIVE prompt.
                return self.tiled_denoise(x, condition[:1], negative, t, tiling, tile)
            uncond, cond = self.tiled_denoise(torch.cat([x, x]), condition, torch.cat([negative, text]), t, tiling,
                                              tile).float().chunk(2)
            return uncond + scale * (cond - uncond)

        return truncated_sample(model, start, schedule, renoise=_draws(second), step_noise=_draws(generator))

    def _restore_v1(self, lr, generator, schedule, knobs, tiling):
        """As the v1 sampler: one generator draws, in order, the start noise, a draw the release makes
        and discards, the re-noising noise and each step's noise. The condition is the posterior mode."""
        scale = knobs.guidance_scale
        guided = scale != 1
        text, negative = self._texts(knobs, guided)
        vae = self.condition_vae
        condition = vae_encode(vae, (lr * 2 - 1).to(self.dtype), tiling).mode().float() * vae.config.scaling_factor
        start = randn(condition.shape, generator, lr)
        tile = self.denoiser_tile(start, tiling)

        def model(x, t, cfg):
            # v1 guides every evaluation, the first included, with two separate calls.
            eps = self.tiled_denoise(x, condition, text, t, tiling, tile).float()
            if not guided:
                return eps
            uncond = self.tiled_denoise(x, condition, negative, t, tiling, tile).float()
            return uncond + scale * (eps - uncond)

        draw = _draws(generator)
        renoise = lambda x: (draw(x), draw(x))[1]  # noqa: E731 - the first draw is discarded as in p_sample_tao
        return truncated_sample(model, start, schedule, renoise=renoise, step_noise=draw)


# -- v2 release folders --------------------------------------------------------------------------

def load_v2(folder: Path, dtype: torch.dtype):
    """The release's `controlnet/` and `vae/` folders (diffusers layout) -> (ControlNet, VAE)."""
    from diffusers import AutoencoderKL

    for part in ("controlnet", "vae"):
        if not (folder / part / "config.json").is_file():
            raise WeightsError(f"{folder}: not a CCSR-v2 weights folder (missing {part}/config.json)")
    controlnet = load_v2_controlnet(folder, dtype)
    try:
        with quiet_loading():
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{folder}: cannot load the CCSR-v2 weights: {first_line(error)}") from None
    return controlnet, vae


def load_v2_controlnet(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The release's `controlnet/` folder (the stage-1 result, or the pre-trained ControlNet it starts from)."""
    if not (folder / "controlnet" / "config.json").is_file():
        raise WeightsError(f"{folder}: not a CCSR-v2 weights folder (missing controlnet/config.json)")
    config = json.loads((folder / "controlnet" / "config.json").read_text())
    if not config.get("use_vae_encode_condition", False):
        raise WeightsError(f"{folder / 'controlnet'}: this ControlNet takes an image condition, not CCSR's VAE-latent "
                           "condition (use_vae_encode_condition is not set)")
    try:
        with quiet_loading():
            return controlnet_class().from_pretrained(folder, subfolder="controlnet", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{folder}: cannot load the CCSR-v2 weights: {first_line(error)}") from None


def write_random_v2(base: Path, out: Path, seed: int = 0) -> None:
    """A random CCSR-v2 folder shaped for `base`: controlnet/ (config as the release writes it, with
    `use_vae_encode_condition`) and vae/ (the base VAE with its decoder perturbed: the stage-2 VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with quiet_loading():
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        controlnet = controlnet_from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            # Zero-initialised convs and a copy of the UNet would hide mistakes: perturb everything.
            scale = 0.05 if ("controlnet_" in name or "condition_conv_in" in name) else 0.01
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
        for name, parameter in vae.named_parameters():
            if name.startswith(("decoder.", "post_quant_conv.")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    save_v2(controlnet, vae, out)


def save_v2(controlnet: nn.Module, vae: nn.Module, out: Path) -> list[Path]:
    """Write a CCSR-v2 weights folder: controlnet/ and vae/ in the diffusers layout, the ControlNet's config
    as the release's diffusers (0.21) writes it with its ControlNetModel class. Returns the files written."""
    out = Path(out)
    with quiet_loading():
        controlnet.save_pretrained(out / "controlnet")
        vae.save_pretrained(out / "vae")
    config_file = out / "controlnet" / "config.json"
    config = json.loads(config_file.read_text())
    config.update({"_class_name": "ControlNetModel", "_diffusers_version": "0.21.0"})
    config_file.write_text(json.dumps(config, indent=2))
    return sorted(file for part in ("controlnet", "vae") for file in (out / part).iterdir() if file.is_file())
