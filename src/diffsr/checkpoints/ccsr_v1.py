"""CCSR v1's release checkpoint (csslc/CCSR, branch CCSR-v1.0): `real-world_ccsr.ckpt`, LDM/Lightning layout.

Keys: `model.diffusion_model.*` (SD 2.1 UNet), `control_model.*` (a ControlNet whose first conv takes the noisy
latent concatenated with the condition latent: 8 channels, no hint block), `cond_encoder.encoder.*` and
`cond_encoder.quant_conv.*` (a VAE-encoder copy for the condition), `first_stage_model.*` (the VAE with the
stage-2 decoder) and `cond_stage_model.*` (OpenCLIP, the same text tower the base's text encoder holds; not
read, not written). Reading uses diffusers' LDM converters; writing maps the diffusers names back
(checkpoints.ldm), which diffusers has no function for.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffsr.backbone import quiet_loading
from diffsr.checkpoints import detect as detect_method, ldm, read_method_weights
from diffsr.errors import WeightsError, first_line
from diffsr.nets.ccsr_controlnet import controlnet_like

UNET, CONTROL, VAE, COND = "model.diffusion_model.", "control_model.", "first_stage_model.", "cond_encoder."
PREFIXES = (UNET, CONTROL, VAE, COND)  # what diffsr reads (and the registry keeps of a converted copy)


@dataclass
class Parts:
    """State dicts in diffusers' names: the UNet, the CCSR ControlNet (diffsr.nets.ccsr_controlnet), the VAE and
    the condition VAE (the checkpoint's condition encoder with the VAE's decoder)."""

    unet: dict
    controlnet: dict
    vae: dict
    condition_vae: dict

    def load_onto(self, path: str | Path, backbone) -> tuple[nn.Module, nn.Module]:
        """Load the UNet and VAE into `backbone` (in place, strictly, in its dtype) and return the ControlNet and the
        condition VAE built for the rest; one line names a part that does not fit the base."""
        with quiet_loading():  # diffusers notes every .to(dtype) of a model
            controlnet, condition_vae = controlnet_like(backbone.unet), copy.deepcopy(backbone.vae)
        for module, state, prefix in ((backbone.unet, self.unet, UNET), (controlnet, self.controlnet, CONTROL),
                                      (backbone.vae, self.vae, VAE), (condition_vae, self.condition_vae, COND)):
            try:
                module.load_state_dict({k: v.to(backbone.dtype) for k, v in state.items()}, strict=True)
            except RuntimeError as error:
                raise WeightsError(f"{path}: its {prefix[:-1]} does not fit the base model ({first_line(error)})") \
                    from None
        return controlnet, condition_vae


def detect(state: dict) -> bool:
    """An LDM state (or Lightning checkpoint) with CCSR's `control_model.*` tensors."""
    return detect_method(state) == "ccsr"


def read(path: str | Path, unet_config: dict, vae_config: dict) -> Parts:
    """The checkpoint at `path` converted for a base with these UNet and VAE configs."""
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    weights = read_method_weights(path, "ccsr")
    state = weights.get("state_dict", weights)
    for prefix in PREFIXES:
        if not any(key.startswith(prefix) for key in state):
            raise WeightsError(f"{path}: not a CCSR-v1 checkpoint (no '{prefix}*' tensors)")
    unet_config, vae_config = dict(unet_config), dict(vae_config)
    control = convert_controlnet_checkpoint(state, unet_config)
    # The first conv sees cat(x, condition): split it into conv_in(x) + condition_conv_in(condition).
    first, latent = control.pop("conv_in.weight"), unet_config["in_channels"]
    control["conv_in.weight"], control["condition_conv_in.weight"] = first[:, :latent], first[:, latent:]
    control["condition_conv_in.bias"] = torch.zeros_like(control["conv_in.bias"])
    condition = {VAE + key[len(COND):]: value for key, value in state.items() if key.startswith(COND)}
    condition.update({key: value for key, value in state.items() if key.startswith((VAE + "decoder.",
                                                                                     VAE + "post_quant_conv."))})
    return Parts(convert_ldm_unet_checkpoint(state, unet_config), control,
                 convert_ldm_vae_checkpoint(state, vae_config), convert_ldm_vae_checkpoint(condition, vae_config))


def write(parts: Parts, path: str | Path) -> None:
    """A Lightning checkpoint ({"state_dict": ...}) with the release's names (no `cond_stage_model.*`)."""
    layers = 1 + max(int(m[1]) for key in parts.unet if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", key)))
    levels = 1 + max(int(m[1]) for key in parts.vae if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", key)))
    control = dict(parts.controlnet)
    # conv_in and condition_conv_in fused into the 8-channel first conv of the v1 model
    weight = torch.cat([control.pop("conv_in.weight"), control.pop("condition_conv_in.weight")], dim=1)
    bias = control.pop("conv_in.bias") + control.pop("condition_conv_in.bias")
    control = {**ldm.unet_to_ldm(control, layers), "input_blocks.0.0.weight": weight, "input_blocks.0.0.bias": bias}
    state = {UNET + k: v for k, v in ldm.unet_to_ldm(parts.unet, layers).items()}
    state.update({CONTROL + k: v for k, v in control.items()})
    state.update({VAE + k: v for k, v in ldm.vae_to_ldm(parts.vae, {}, levels).items()})
    state.update({COND + k: v for k, v in ldm.vae_to_ldm(parts.condition_vae, {}, levels).items()
                  if k.startswith(("encoder.", "quant_conv."))})
    torch.save({"state_dict": {k: v.contiguous() for k, v in state.items()}}, path)
