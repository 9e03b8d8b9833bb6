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
import re
from pathlib import Path

import torch

from diffsr.backbone import Backbone, quiet_loading
from diffsr.checkpoints import read_method_weights
from diffsr.errors import WeightsError

UNET, CONTROL, VAE, COND = "model.diffusion_model.", "control_model.", "first_stage_model.", "cond_encoder."


def _state(weights: dict) -> dict:
    return weights.get("state_dict", weights)


def load_v1(path: Path, backbone: Backbone):
    """Read `path`, load its UNet and VAE into `backbone` (in place), return (ControlNet, condition VAE)."""
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    from diffsr.methods.ccsr import controlnet_class

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
            first_line = str(error).strip().splitlines()[0]
            raise WeightsError(f"{path}: its {label} does not fit the base model ({first_line})") from None
    return controlnet, condition_vae


def _controlnet_config(unet) -> dict:
    from diffusers import ControlNetModel

    with torch.device("meta"):
        plain = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return {k: v for k, v in plain.config.items() if not k.startswith("_")}


# -- diffusers -> LDM names (for writing checkpoints) ----------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_RESNET[layer]}.{param}"


def unet_key_to_ldm(key: str, layers: int, up_attention: list[bool]) -> str:
    """A diffusers UNet/ControlNet key -> its LDM name (openaimodel layout, SD 2.x)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "controlnet_mid_block": "middle_block_out.0"}
    name, _, param = key.rpartition(".")
    if name in fixed:
        return f"{fixed[name]}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", name):
        return f"zero_convs.{m[1]}.0.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = 1 + int(m[1]) * (layers + 1) + int(m[3])
        return f"input_blocks.{index}." + (f"0.{_resnet(m[4])}" if m[2] == "resnets" else f"1.{m[4]}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = int(m[1]) * (layers + 1) + int(m[3])  # up levels have layers + 1 blocks
        return f"output_blocks.{index}." + (f"0.{_resnet(m[4])}" if m[2] == "resnets" else f"1.{m[4]}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if up_attention[block] else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_key_to_ldm(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key -> its LDM name (ldm.modules.diffusionmodules.model layout)."""
    def inner(rest):
        layer, _, param = rest.partition(".")
        return f"nin_shortcut.{param}" if layer == "conv_shortcut" else rest

    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{inner(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{inner(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{inner(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key.replace("conv_norm_out", "norm_out")


def unet_to_ldm(state: dict, config) -> dict:
    up_attention = ["CrossAttn" in kind for kind in config.up_block_types]
    return {unet_key_to_ldm(k, config.layers_per_block, up_attention): v for k, v in state.items()}


def vae_to_ldm(state: dict, config) -> dict:
    out = {}
    for key, value in state.items():
        name = vae_key_to_ldm(key, len(config.block_out_channels))
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out[name] = value
    return out


def controlnet_to_ldm(controlnet, unet_config) -> dict:
    """The CCSR ControlNet -> `control_model.*` names, with conv_in and condition_conv_in fused into the
    8-channel first conv the v1 model has."""
    state = dict(controlnet.state_dict())
    weight = torch.cat([state.pop("conv_in.weight"), state.pop("condition_conv_in.weight")], dim=1)
    bias = state.pop("conv_in.bias") + state.pop("condition_conv_in.bias")
    out = unet_to_ldm(state, unet_config)
    out["input_blocks.0.0.weight"], out["input_blocks.0.0.bias"] = weight, bias
    return out


def write_random_v1(base: Path, out_file: Path, seed: int = 0) -> None:
    """A random `real-world_ccsr.ckpt`-format checkpoint for `base` (Lightning dict with `state_dict`).
    The OpenCLIP `cond_stage_model.*` tensors of the release are left out: the loader never reads them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffsr.methods.ccsr import controlnet_from_unet

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
    state = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    state.update({CONTROL + k: v for k, v in controlnet_to_ldm(controlnet, unet.config).items()})
    state.update({VAE + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    state.update({COND + k: v for k, v in vae_to_ldm(cond_vae.state_dict(), vae.config).items()
                  if k.startswith(("encoder.", "quant_conv."))})
    torch.save({"state_dict": {k: v.contiguous() for k, v in state.items()}}, out_file)
