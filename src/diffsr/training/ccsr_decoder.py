"""CCSR stage 2: fine-tune the VAE decoder on latents the stage-1 model restores (csslc/CCSR).

The loss is the LDM autoencoder GAN loss as CCSR v1 trains its decoder (configs/model/ccsr_stage2.yaml,
LPIPSWithDiscriminator: L1 + LPIPS + PatchGAN hinge with the adaptive weight x 0.5 from step 1; the
decoder and post_quant_conv train, Adam(0.5, 0.9) at 5e-6). The latents come from the stage-1 CCSR-v2
model through its own sampler (CCSR.sample_latent; one step from the noised LR
latent by default, as the v2 train_ccsr_stage2.py). The result is written as a CCSR-v2 weights folder
(controlnet/ from stage 1, vae/ with the trained decoder).

Not reproduced: CCSR v2's own stage-2 loss (MSE + a projected discriminator on frozen DINOv2 features,
lambda 0.05, from step 100), and writing v1 checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.errors import UsageError
from diffsr.checkpoints import ccsr_v2
from diffsr.methods.ccsr import CCSR
from diffsr.training.autoencoder_loss import AutoencoderLoss
from diffsr.training.base import Trainer, global_generator, trainable


class CCSRStage2(Trainer):
    method = "ccsr"
    stage = 2
    phases = (("generator", "generator"), ("discriminator", "discriminator"))

    def __init__(self, model: CCSR, latent_steps: int = 1, t_max: float | None = None, prompt: str = "",
                 lpips_weights=None, disc_start: int = 1, disc_weight: float = 0.5, perceptual_weight: float = 1.0):
        """`model`: the stage-1 CCSR-v2 model (loaded from its folder, controlnet/ + vae/); `latent_steps`, `t_max`:
        the sampler's settings for the training latents (the release's num_inference_steps=1, t_max=0.6667);
        `prompt`: the captions of the release's data set (empty)."""
        super().__init__()
        if model.version != 2:
            raise UsageError("CCSR stage 2 trains the v2 release's VAE; give a CCSR-v2 folder (controlnet/ + vae/), "
                             "not a v1 checkpoint")
        self.model = model
        self.unet, self.controlnet = model.backbone.unet, model.controlnet
        self.text_encoder, self.vae = model.backbone.text_encoder, model.backbone.vae
        self.latent_steps, self.t_max, self.prompt = latent_steps, t_max, prompt
        self.loss = AutoencoderLoss(lpips_weights, disc_start=disc_start, disc_weight=disc_weight,
                                    perceptual_weight=perceptual_weight, adaptive_weight=True)
        self.requires_grad_(False)
        for part in (self.vae.decoder, self.vae.post_quant_conv, self.loss.discriminator):
            part.requires_grad_(True).train()

    @classmethod
    def from_config(cls, config) -> "CCSRStage2":
        if config.weights is None:
            raise UsageError("CCSR stage 2 needs the stage-1 model (weights=<CCSR-v2 folder>): it decodes that "
                             "model's latents")
        return cls(CCSR.load(config.base, config.weights), **cls.method_args(config))

    def parameter_groups(self):
        return {"generator": trainable(self.vae.decoder, self.vae.post_quant_conv),
                "discriminator": trainable(self.loss.discriminator)}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "controlnet": self.controlnet, "text_encoder": self.text_encoder,
                "vae_encoder": self.vae.encoder, "vae_quant_conv": self.vae.quant_conv}

    def released_frozen(self) -> list[nn.Module]:
        return [self.controlnet, self.vae]  # the v2 folder holds both whole

    def enable_gradient_checkpointing(self):
        self.vae.enable_gradient_checkpointing()  # as the release (--gradient_checkpointing)

    def upscaler(self) -> CCSR:
        return self.model

    @torch.no_grad()
    def restored_latents(self, batch: dict) -> torch.Tensor:
        """The stage-1 model's latent for each LR of the batch (bicubic-upscaled to the HR size)."""
        model = self.upscaler()
        lr = F.interpolate(batch["lr"], size=batch["hr"].shape[-2:], mode="bicubic").clamp(0, 1)
        latents = [model.sample_latent(image[None].to(model.dtype), global_generator(lr.device), prompt=self.prompt,
                                       steps=self.latent_steps, t_max=self.t_max) for image in lr]
        return torch.cat(latents).float().contiguous()

    def forward(self, batch, phase):
        hr = batch["hr"] * 2 - 1
        if phase == "generator":
            latent = self.restored_latents(batch)
            vae = self.vae
            decoded = vae.decode((latent / vae.config.scaling_factor).to(vae.dtype)).sample.float()
            batch["fake"] = decoded.detach()
            return self.loss.generator_loss(hr, decoded, self.global_step, last_layer=vae.decoder.conv_out.weight)
        return self.loss.discriminator_loss(hr, batch["fake"], self.global_step)

    def save_release(self, folder: Path) -> list[Path]:
        """A CCSR-v2 weights folder: controlnet/ (the stage-1 model's) and vae/ (the trained decoder)."""
        with self.float32_frozen():
            return ccsr_v2.write(ccsr_v2.Parts(self.controlnet, self.vae), Path(folder))
