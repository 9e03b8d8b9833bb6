"""CCSR's ControlNet: diffusers' ControlNetModel whose image-condition encoder is one conv on the LR latent
(the release's `use_vae_encode_condition`). Shared by both CCSR releases' loaders and the trainer."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


def _controlnet_init(self, use_vae_encode_condition: bool = True, **config):
    from diffusers import ControlNetModel

    ControlNetModel.__init__(self, **config)
    # The release replaces the image-space condition encoder by one conv on the LR latent; the
    # ControlNet adds its output to conv_in(x) exactly where the encoder's output would go.
    self.controlnet_cond_embedding = nn.Identity()
    self.condition_conv_in = nn.Conv2d(self.config.in_channels, self.config.block_out_channels[0], 3, padding=1)


@functools.cache
def controlnet_class():
    """diffusers' ControlNetModel with the release's `use_vae_encode_condition` conv (built on first use
    so that importing diffsr does not import diffusers)."""
    from diffusers import ControlNetModel
    from diffusers.configuration_utils import register_to_config

    # The config keys are ControlNetModel's plus the flag: give __init__ that signature so that
    # from_pretrained passes every saved key through.
    signature = inspect.signature(ControlNetModel.__init__)
    flag = inspect.Parameter("use_vae_encode_condition", inspect.Parameter.KEYWORD_ONLY, default=True)
    _controlnet_init.__signature__ = signature.replace(parameters=[*signature.parameters.values(), flag])

    class CCSRControlNet(ControlNetModel):
        __init__ = register_to_config(_controlnet_init)

        def forward(self, sample, timestep, encoder_hidden_states, condition_latent, **kwargs):
            """(down residuals, mid residual) for the UNet; `condition_latent` is the scaled LR latent."""
            return super().forward(sample, timestep, encoder_hidden_states,
                                   controlnet_cond=self.condition_conv_in(condition_latent), return_dict=False, **kwargs)

    return CCSRControlNet


def controlnet_from_unet(unet, condition_seed: int | None = None) -> nn.Module:
    """A CCSR ControlNet copied from `unet`'s encoder half. Its condition conv starts at zero like the zero convs
    (random test weights), or with `condition_seed` at torch's default initialisation drawn from that seed (the
    release's training start; a fixed seed keeps a fresh run reproducible from its config)."""
    from diffusers import ControlNetModel

    plain = ControlNetModel.from_unet(unet)
    model = controlnet_class()(**_config(plain))
    model.load_state_dict({k: v for k, v in plain.state_dict().items() if "controlnet_cond_embedding" not in k}, strict=False)
    if condition_seed is None:
        torch.nn.init.zeros_(model.condition_conv_in.weight)
        torch.nn.init.zeros_(model.condition_conv_in.bias)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(condition_seed)
            model.condition_conv_in.reset_parameters()
    return model


def controlnet_like(unet) -> nn.Module:
    """A CCSR ControlNet shaped like `unet`'s encoder half, its weights left to be loaded (from a checkpoint)."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        plain = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return controlnet_class()(**_config(plain)).to(unet.dtype)


def _config(controlnet) -> dict:
    return {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
