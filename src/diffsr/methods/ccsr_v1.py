"""CCSR v1 (`real-world_ccsr.ckpt`, LDM/Lightning layout) converted to the v2 modules.

Keys: `model.diffusion_model.*` (SD 2.1 UNet), `control_model.*` (ControlNet whose first conv takes the
noisy latent concatenated with the condition latent: 8 channels, no hint block), `cond_encoder.encoder.*`
and `cond_encoder.quant_conv.*` (a VAE-encoder copy for the condition), `first_stage_model.*` (the VAE with
the stage-2 decoder) and `cond_stage_model.*` (OpenCLIP, the same text tower the base's text encoder
holds; not read). Loading uses diffusers' own LDM converters; writing (tiny test checkpoints) maps the
diffusers names back, which diffusers has no function for.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from diffsr.backbone import Backbone, quiet_loading
from diffsr.checkpoints import ldm, read_method_weights
from diffsr.errors import WeightsError, first_line

UNET, CONTROL, VAE, COND = "model.diffusion_model.", "control_model.", "first_stage_model.", "cond_encoder."


def _state(weights: dict) -> dict:
    return weights.get("state_dict", weights)


def load_v1(path: Path, backbone: Backbone):
    """Read `path`, load its UNet and VAE into `backbone` (in place), return (ControlNet, condition VAE)."""
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    from diffsr.nets.ccsr_controlnet import controlnet_class

    state = _state(read_method_weights(path, "ccsr"))
    for prefix in (UNET, CONTROL, VAE, COND):
        if not any(key.startswith(prefix) for key in state):
            raise WeightsError(f"{path}: not a CCSR-v1 checkpoint (no '{prefix}*' tensors)")
    unet, vae = backbone.unet, backbone.vae
    with quiet_loading():  # diffusers notes every .to(dtype) of a model
        controlnet = controlnet_class()(**_controlnet_config(unet)).to(backbone.dtype)
    condition_vae = copy.deepcopy(vae)
    cond_state = {VAE + key[len(COND):]: value for key, value in state.items() if key.startswith(COND)}
    cond_state.update({key: value for key, value in state.items() if key.startswith(VAE + "decoder.")
                       or key.startswith(VAE + "post_quant_conv.")})
    control = convert_controlnet_checkpoint(state, dict(unet.config))
    # The first conv sees cat(x, condition): split it into conv_in(x) + condition_conv_in(condition).
    first = control.pop("conv_in.weight")
    latent = unet.config.in_channels
    control["conv_in.weight"], control["condition_conv_in.weight"] = first[:, :latent], first[:, latent:]
    control["condition_conv_in.bias"] = torch.zeros_like(control["conv_in.bias"])
    parts = ((unet, convert_ldm_unet_checkpoint(state, dict(unet.config)), "model.diffusion_model"),
             (controlnet, control, "control_model"),
             (vae, convert_ldm_vae_checkpoint(state, dict(vae.config)), "first_stage_model"),
             (condition_vae, convert_ldm_vae_checkpoint(cond_state, dict(vae.config)), "cond_encoder"))
    for module, converted, label in parts:
        try:
            module.load_state_dict({k: v.to(backbone.dtype) for k, v in converted.items()}, strict=True)
        except RuntimeError as error:
                        raise WeightsError(f"{path}: its {label} does not fit the base model ({first_line(error)})") from None
    return controlnet, condition_vae


def _controlnet_config(unet) -> dict:
    from diffusers import ControlNetModel

    with torch.device("meta"):
        plain = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return {k: v for k, v in plain.config.items() if not k.startswith("_")}


# -- diffusers -> LDM names (for writing checkpoints) ----------------------------------------------

def controlnet_to_ldm(controlnet, unet_config) -> dict:
    """The CCSR ControlNet -> `control_model.*` names, with conv_in and condition_conv_in fused into the
    8-channel first conv the v1 model has."""
    state = dict(controlnet.state_dict())
    weight = torch.cat([state.pop("conv_in.weight"), state.pop("condition_conv_in.weight")], dim=1)
    bias = state.pop("conv_in.bias") + state.pop("condition_conv_in.bias")
    out = ldm.unet_to_ldm(state, unet_config.layers_per_block)
    out["input_blocks.0.0.weight"], out["input_blocks.0.0.bias"] = weight, bias
    return out


def write_random_v1(base: Path, out_file: Path, seed: int = 0) -> None:
    """A random `real-world_ccsr.ckpt`-format checkpoint for `base` (Lightning dict with `state_dict`).
    The OpenCLIP `cond_stage_model.*` tensors of the release are left out: the loader never reads them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffsr.nets.ccsr_controlnet import controlnet_from_unet

    with quiet_loading():
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        controlnet = controlnet_from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    cond_vae = copy.deepcopy(vae)
    with torch.no_grad():
        for module, amount in ((controlnet, 0.02), (vae.decoder, 0.01), (cond_vae.encoder, 0.01)):
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * amount)
    levels = len(vae.config.block_out_channels)
    state = {UNET + k: v for k, v in ldm.unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()}
    state.update({CONTROL + k: v for k, v in controlnet_to_ldm(controlnet, unet.config).items()})
    state.update({VAE + k: v for k, v in ldm.vae_to_ldm(vae.state_dict(), {}, levels).items()})
    state.update({COND + k: v for k, v in ldm.vae_to_ldm(cond_vae.state_dict(), {}, levels).items()
                  if k.startswith(("encoder.", "quant_conv."))})
    torch.save({"state_dict": {k: v.contiguous() for k, v in state.items()}}, out_file)
