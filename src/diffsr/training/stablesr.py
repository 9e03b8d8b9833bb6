"""StableSR training (IceClear/StableSR), both stages.

Stage 1 (configs/stableSRNew/v2-finetune_text_T_512.yaml, LatentDiffusionSRTextWT): the SD UNet stays
frozen; its SFT layers and the time-aware encoder learn the eps (or v) loss. Both the HR and the
bicubic-upscaled LR are encoded by the frozen VAE (posterior samples x scale factor); the HR latent is
noised at t ~ U{0..999}, the clean LR latent goes to the encoder with the same t; the prompt is empty.

Stage 2 (configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml, AutoencoderKLResi): the CFW fusion
layers (and the discriminator) learn the LDM autoencoder loss with a fixed adversarial weight 0.025,
decoding latents the stage-1 model generated from the LR, with the encoder features of the upscaled LR.
The release generates those latents offline (scripts/generate_vqgan_data.py: DDPM, 200 steps from the
LR latent noised to t=999). Here the trainer generates them per batch, under no_grad, with the same
sampler (`latent_steps`): the loop's batches are degraded on the fly, and a latent must belong to its
batch's LR; no extra data step or storage. The cost is `latent_steps` UNet calls per micro-batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.backbone import load_backbone
from diffsr.checkpoints import stablesr as checkpoint
from diffsr.errors import UsageError
from diffsr.methods.stablesr import StableSR
from diffsr.nets.stablesr_nets import CFWAutoencoder, SFTUNet, TimeAwareEncoder
from diffsr.training.autoencoder_loss import AutoencoderLoss
from diffsr.training.base import Trainer, global_generator, trainable

RELEASE_NAME = "stablesr_000117.ckpt"


def frozen_leaves(module: nn.Module, prefix: str, skip: str) -> dict[str, nn.Module]:
    """The submodules of `module` that hold tensors themselves, outside any submodule named `skip`:
    the frozen part of a network whose trained layers sit inside it (the SFT layers in the UNet)."""
    leaves = {}
    for name, sub in module.named_modules():
        if skip in name.split("."):
            continue
        if next(sub.parameters(recurse=False), None) is not None or next(sub.buffers(recurse=False), None) is not None:
            leaves[f"{prefix}.{name}" if name else prefix] = sub
    return leaves


def release_encoder_init(encoder: TimeAwareEncoder) -> TimeAwareEncoder:
    """The release's EncoderUNetModelWT zero-initialises each ResBlock's last conv and each attention's
    output projection (openaimodel's zero_module); diffusers' blocks do not."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    with torch.no_grad():
        for sub in encoder.modules():
            if isinstance(sub, ResnetBlock2D):
                sub.conv2.weight.zero_(), sub.conv2.bias.zero_()
            elif isinstance(sub, Attention):
                sub.to_out[0].weight.zero_(), sub.to_out[0].bias.zero_()
    return encoder


class _StableSRModules(Trainer):
    """What both stages share: the base, the StableSR modules, the empty-prompt text, encoding."""

    method = "stablesr"

    def _build(self, base, weights, encoder_channels: int, prediction_type: str | None, with_fusion: bool):
        """The method to train: the released one (StableSR.load), or fresh SFT layers and encoder on the base."""
        if weights is not None:
            with warnings.catch_warnings():  # "no CFW file beside the weights": the trainer decides that
                warnings.simplefilter("ignore")
                model = StableSR.load(base, weights, prediction_type=prediction_type)
            # Fresh fusion layers in stage 2 (the release initialises them; pass fusion_weights to continue).
            model.autoencoder = CFWAutoencoder(model.backbone.vae, with_fusion=with_fusion)
        else:
            backbone = load_backbone(base)
            unet = SFTUNet(backbone.unet, encoder_channels)
            encoder = release_encoder_init(TimeAwareEncoder(model_channels=encoder_channels, out_channels=encoder_channels,
                                                            norm_groups=backbone.unet.config.norm_num_groups))
            model = StableSR(backbone, unet, encoder, CFWAutoencoder(backbone.vae, with_fusion=with_fusion),
                             prediction_type or backbone.scheduler_config.get("prediction_type", "epsilon"))
        self.model, self.backbone = model, model.backbone
        self.unet, self.encoder, self.autoencoder = model.unet, model.encoder, model.autoencoder
        self.text_encoder = model.backbone.text_encoder
        self.register_buffer("text", model.backbone.encode_prompt([""]).float(), persistent=False)  # null prompt
        self.register_buffer("alphas_cumprod", model.backbone.alphas_cumprod.float(), persistent=False)
        self.requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return self.backbone.vae.config.scaling_factor

    def upscaled_lr(self, batch: dict) -> torch.Tensor:
        """The LR, bicubic-upscaled to the HR size in [-1, 1] (the release's resize_lq)."""
        lr = F.interpolate(batch["lr"], size=batch["hr"].shape[-2:], mode="bicubic")
        return (lr * 2 - 1).clamp(-1, 1)

    def upscaler(self) -> StableSR:
        return self.model

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.backbone.vae, "text_encoder": self.text_encoder}

    def model_parts(self, global_step: int = 0) -> checkpoint.Parts:
        """What the release's model file holds: the UNet with its SFT layers, the encoder, the VAE, the schedule."""
        return checkpoint.Parts(unet=self.backbone.unet.state_dict(), encoder=self.encoder.state_dict(),
                                encoder_config=self.encoder.config, vae=self.backbone.vae.state_dict(),
                                alphas_cumprod=self.alphas_cumprod, global_step=global_step)

    def released_frozen(self) -> list[nn.Module]:
        # The main checkpoint holds the whole UNet and VAE (and the encoder, frozen in stage 2).
        return [self.backbone.unet, self.backbone.vae, self.encoder]


class StableSRStage1(_StableSRModules):
    stage = 1
    phases = (("generator", "generator"),)

    def __init__(self, base, weights=None, encoder_channels: int = 256, prediction_type: str | None = None):
        """`encoder_channels`: the time-aware encoder's width and the SFT condition width (the release's 256)."""
        super().__init__()
        self._build(base, weights, encoder_channels, prediction_type, with_fusion=False)
        self.encoder.requires_grad_(True).train()
        for name, parameter in self.unet.named_parameters():
            parameter.requires_grad_(".sft." in name)

    def parameter_groups(self):
        return {"generator": trainable(self.encoder, self.unet)}

    def frozen_modules(self):
        return {**super().frozen_modules(), **frozen_leaves(self.unet.unet, "unet", "sft")}

    def enable_gradient_checkpointing(self):
        # The frozen UNet holds the SFT layers, so its activations are needed for the backward pass.
        self.unet.unet.enable_gradient_checkpointing()

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.backbone.vae
        latent = vae.encode(image.to(vae.dtype)).latent_dist.sample().float() * self.scaling_factor
        # The VAE's latent comes out with channels-last strides; the UNet's backward pass on such an input
        # crashes torch 2.13 on CPU (segfault), so hand it a standard layout.
        return latent.contiguous()

    def forward(self, batch, phase):
        latent_hr = self.encode(batch["hr"] * 2 - 1)
        latent_lr = self.encode(self.upscaled_lr(batch))
        count = latent_hr.shape[0]
        t = torch.randint(0, len(self.alphas_cumprod), (count,), device=latent_hr.device)
        noise = torch.randn_like(latent_hr)
        loss = self.diffusion_loss(latent_hr, latent_lr, t, noise, self.text.expand(count, -1, -1))
        return loss, {"loss_simple": loss.item()}

    def diffusion_loss(self, latent_hr: torch.Tensor, latent_lr: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       text: torch.Tensor) -> torch.Tensor:
        """The release's p_losses: the HR latent noised at t, the clean LR latent into the encoder at the same
        t, MSE to the noise (or to v for a v-prediction base)."""
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latent_hr + (1 - alpha_bar).sqrt() * noise
        output = self.model.network(noisy, latent_lr, t, text)
        if self.model.prediction == "v_prediction":
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latent_hr
        else:
            target = noise
        return F.mse_loss(output.float(), target)

    def save_release(self, folder: Path) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self.float32_frozen():
            return [checkpoint.write(self.model_parts(self.global_step), folder / RELEASE_NAME)]


class StableSRStage2(_StableSRModules):
    stage = 2
    phases = (("generator", "generator"), ("discriminator", "discriminator"))

    def __init__(self, base, weights=None, fusion_weights=None, latent_steps: int = 200, fusion_w: float = 1.0,
                 lpips_weights=None, disc_start: int = 501, disc_weight: float = 0.025, perceptual_weight: float = 1.0,
                 prediction_type: str | None = None):
        """`weights`: the stage-1 model (release .ckpt) that generates the latents; `fusion_weights`: a CFW
        file to continue from (else the fusion layers start fresh); `latent_steps`: DDPM steps per latent
        (the release's generate_vqgan_data.py --ddpm_steps 200); `fusion_w`: the CFW weight while training."""
        super().__init__()
        if weights is None:
            raise UsageError("StableSR stage 2 needs the stage-1 model (weights=...): it decodes that model's latents")
        self._build(base, weights, 0, prediction_type, with_fusion=True)
        if fusion_weights is not None:
            unet_config = self.backbone.unet.config
            parts = checkpoint.read_cfw(fusion_weights, unet_config, self.backbone.vae.config, unet_config.norm_num_groups)
            checkpoint.load_into(self.autoencoder.fusion, parts.fusion, fusion_weights, "CFW fusion layers")
        self.latent_steps, self.fusion_w = latent_steps, fusion_w
        # Fixed adversarial weight: the release's decoder is frozen, so its adaptive weight falls back to 0.025.
        self.loss = AutoencoderLoss(lpips_weights, disc_start=disc_start, disc_weight=disc_weight,
                                    perceptual_weight=perceptual_weight, adaptive_weight=False)
        self.autoencoder.fusion.requires_grad_(True).train()
        self.loss.discriminator.requires_grad_(True).train()

    def parameter_groups(self):
        return {"generator": trainable(self.autoencoder.fusion), "discriminator": trainable(self.loss.discriminator)}

    def frozen_modules(self):
        return {**super().frozen_modules(), "unet": self.unet, "encoder": self.encoder}

    def enable_gradient_checkpointing(self):
        # Nothing: the fusion layers join the decoder through hooks that live only during the forward pass, so a
        # checkpointed decoder would recompute without them; the release trains this stage without checkpointing.
        pass

    @torch.no_grad()
    def generate_latent(self, lr: torch.Tensor):
        """(stage-1 latent, encoder features of the LR) for one batch, as generate_vqgan_data.py."""
        model = self.upscaler()
        generator = global_generator(lr.device)
        dist, features = self.autoencoder.encode(lr.to(model.dtype))
        condition = dist.sample(generator).float() * self.scaling_factor
        latent = model.sample(condition, self.text.expand(lr.shape[0], -1, -1).to(model.dtype), generator,
                              self.latent_steps, sampler="ddpm", start="lr")
        return latent, features

    def forward(self, batch, phase):
        hr = batch["hr"] * 2 - 1
        if phase == "generator":
            latent, features = self.generate_latent(self.upscaled_lr(batch))
            vae_dtype = self.backbone.vae.dtype
            decoded = self.autoencoder.decode((latent / self.scaling_factor).to(vae_dtype), features, self.fusion_w)
            batch["fake"] = decoded.detach()
            return self.loss.generator_loss(hr, decoded.float(), self.global_step)
        return self.loss.discriminator_loss(hr, batch["fake"].float(), self.global_step)

    def save_release(self, folder: Path) -> list[Path]:
        """The CFW file and, beside it, the stage-1 model it belongs to (how `load` finds the pair)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self.float32_frozen():  # the parts' tensors are taken inside: the frozen VAE at its float32 values
            cfw = checkpoint.Parts(vae=self.backbone.vae.state_dict(), fusion=self.autoencoder.fusion.state_dict(),
                                   discriminator=self.loss.discriminator.state_dict(), global_step=self.global_step)
            return [checkpoint.write(self.model_parts(), folder / RELEASE_NAME),
                    checkpoint.write(cfw, folder / checkpoint.CFW_NAME)]
