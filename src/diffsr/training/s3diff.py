"""S3Diff training (ArcticHare105/S3Diff src/train_s3diff.py): one-step SR on SD-Turbo with degradation-guided
LoRA, trained with 2 MSE + 5 LPIPS, online negative prompting and a vision-aided GAN.

Each iteration runs three optimiser steps, as released:
1. reconstruction: each sample, with probability 0.05, gets the negative prompt and the upscaled LR itself as
   its target (online negative prompting); the others the positive prompt and the HR image;
2. adversarial: the generator again, positive prompt, 0.5 x the discriminator's loss with the "real" label;
3. discriminator: 0.5 x (loss on the HR images as real + loss on step 2's outputs as fake). The release
   steps its discriminator optimiser twice here (real, then fake); this is one step on their sum.
Trained: the UNet's LoRA and conv_in, the VAE encoder's LoRA, the degradation MLPs and block embeddings
(generator optimiser); the discriminator's heads (discriminator optimiser). Frozen: SD's weights, the
text encoder, the degradation estimator (de_net.pth, scores the LR) and the DINO backbone.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.backbone import load_backbone
from diffsr.checkpoints import read_method_weights
from diffsr.errors import UsageError, WeightsError
from diffsr.lora import add_degradation_lora
from diffsr.methods.s3diff import (NEGATIVE_PROMPT, POSITIVE_PROMPT, RANK_UNET, RANK_VAE, TIMESTEP, UNET_ADAPTER,
                                   UNET_TARGETS, VAE_ADAPTER, VAE_TARGETS, DegradationConditioner, S3Diff,
                                   _checked_weights, attach_degradation_lora, unet_block, vae_block, write_release)
from diffsr.nets.de_net import load_de_net
from diffsr.samplers import x0_from_eps
from diffsr.training.base import Trainer, trainable
from diffsr.training.gan import DINO, VisionAidedDiscriminator, load_dino
from diffsr.training.losses import PerceptualLoss

MLP_INIT_SCALE = 1e-5  # the release: basicsr default_init_weights(mlps, 1e-5), i.e. Kaiming normal x 1e-5


def frozen_parts(model: nn.Module) -> nn.ModuleDict:
    """The largest submodules of `model` without a trainable parameter (e.g. every LoRA layer's base layer).
    Assumes no module holds frozen parameters of its own beside trainable children (true of diffusers models)."""
    parts = nn.ModuleDict()

    def visit(name: str, module: nn.Module) -> None:
        if not any(p.requires_grad for p in module.parameters()):
            parts[name.replace(".", "/") or "all"] = module
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return parts


class S3DiffTrainer(Trainer):
    method = "s3diff"
    stage = 1
    phases = (("reconstruction", "generator"), ("adversarial", "generator"), ("discriminator", "discriminator"))

    def __init__(self, base, weights=None, de_net=None, dino=DINO, lpips_weights=None, lora_rank_unet=None,
                 lora_rank_vae=None, lambda_l2=2.0, lambda_lpips=5.0, lambda_gan=0.5, negative_prob=0.05,
                 positive_prompt=POSITIVE_PROMPT, negative_prompt=NEGATIVE_PROMPT, diff_augment=True):
        """`weights`: an s3diff.pkl to fine-tune (its ranks are used); None: new adapters, initialised as the
        release does. `de_net`: the frozen degradation estimator (by default de_net.pth beside `weights`).
        `dino`: transformers hub id or folder of the discriminator's DINO ViT."""
        super().__init__()
        if de_net is None:
            if weights is None:
                raise UsageError("s3diff training needs the degradation estimator: pass de_net='de_net.pth' "
                                 "(method_args.de_net; the release's assets/mm-realsr/de_net.pth)")
            de_net = Path(weights).parent / "de_net.pth"
        self.de_net_path = Path(de_net)
        self.estimator = load_de_net(self.de_net_path)
        self.backbone = load_backbone(base)
        self.unet, self.vae, self.text_encoder = self.backbone.unet, self.backbone.vae, self.backbone.text_encoder
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)

        if weights is not None:
            state = read_method_weights(weights, "s3diff")
            _checked_weights(weights, state)
            for name, given, stored in (("lora_rank_unet", lora_rank_unet, state["rank_unet"]),
                                        ("lora_rank_vae", lora_rank_vae, state["rank_vae"])):
                if given is not None and given != stored:
                    raise UsageError(f"{name} {given} differs from {weights}'s rank {stored} "
                                     "(leave it out to fine-tune)")
            self.conditioner = DegradationConditioner(state["rank_vae"], state["rank_unet"])
            try:
                self.conditioner.load_release_state(state)
                self.vae_modulation, self.unet_modulation = attach_degradation_lora(self.backbone, state)
            except WeightsError as error:
                raise WeightsError(f"{weights}: {error}") from None
        else:
            self.conditioner = DegradationConditioner(lora_rank_vae or RANK_VAE, lora_rank_unet or RANK_UNET)
            self._initialise_conditioner()
            # peft's "gaussian" init: A ~ N(0, 1/r), B = 0, alpha 8 (as the release's LoraConfig).
            self.vae_modulation = add_degradation_lora(self.vae, VAE_TARGETS, self.conditioner.ranks["vae"],
                                                       VAE_ADAPTER, vae_block)
            self.unet_modulation = add_degradation_lora(self.unet, UNET_TARGETS, self.conditioner.ranks["unet"],
                                                        UNET_ADAPTER, unet_block)
        for model in (self.unet, self.vae):
            for name, param in model.named_parameters():
                param.requires_grad_("lora" in name)
        self.unet.conv_in.requires_grad_(True)  # trained in full
        self.conditioner.requires_grad_(True)

        self.discriminator = VisionAidedDiscriminator(load_dino(dino), augment=diff_augment)
        self.perceptual = PerceptualLoss(lpips_weights) if lambda_lpips else None  # no weights needed without it
        self.lambda_l2, self.lambda_lpips, self.lambda_gan = lambda_l2, lambda_lpips, lambda_gan
        self.negative_prob = negative_prob
        # (2, 77, d): positive, negative. Constant, so encoded once (as the other trainers do).
        self.register_buffer("text", self.backbone.encode_prompt([positive_prompt, negative_prompt]), persistent=False)
        self.alpha_bar = self.backbone.alphas_cumprod[TIMESTEP].item()
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _initialise_conditioner(self) -> None:
        """As the release's S3Diff.__init__: w and the block embeddings standard normal, the MLPs Kaiming
        normal scaled by 1e-5 with zero biases (so C starts near zero)."""
        # w is fixed, not trained, so not in the loop's checkpoints: a fixed seed lets a resumed run rebuild it.
        self.conditioner.w.copy_(torch.randn(self.conditioner.w.shape, generator=torch.Generator().manual_seed(0)))
        for part in ("vae", "unet"):
            for mlp in ("de_mlp", "block_mlp", "fuse_mlp"):
                for layer in getattr(self.conditioner, f"{part}_{mlp}").modules():
                    if isinstance(layer, nn.Linear):
                        nn.init.kaiming_normal_(layer.weight)
                        layer.weight.data.mul_(MLP_INIT_SCALE)
                        nn.init.zeros_(layer.bias)

    # -- the trainer contract ------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": trainable(self.unet, self.vae, self.conditioner),
                "discriminator": trainable(self.discriminator.heads)}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"unet": frozen_parts(self.unet), "vae": frozen_parts(self.vae), "text_encoder": self.text_encoder,
                "estimator": self.estimator, "dino": self.discriminator.dino}

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()

    def upscaler(self) -> S3Diff:
        backbone = dataclasses.replace(self.backbone, device=self.conditioner.w.device)
        return S3Diff(backbone, self.conditioner, (self.vae_modulation, self.unet_modulation), self.estimator)

    def save_release(self, folder: Path) -> list[Path]:
        """s3diff.pkl (the release's layout) and a copy of the estimator's de_net.pth beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = write_release(folder / "s3diff.pkl", self.unet, self.vae, self.conditioner)
        de_net = folder / "de_net.pth"
        if de_net.resolve() != self.de_net_path.resolve():
            shutil.copyfile(self.de_net_path, de_net)
        return [weights, de_net]

    # -- the model -----------------------------------------------------------------------------------------
    def generate(self, source: torch.Tensor, scores: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The one-step SR output in [-1, 1] for `source` (the upscaled LR in [-1, 1]), degradation scores
        (B, 2) and text states (B, 77, d); the VAE posterior is sampled, as in the release's training."""
        # hold, not use: with gradient checkpointing the backward pass runs the LoRA layers again.
        self.vae_modulation.hold(self.conditioner.matrices("vae", scores))
        self.unet_modulation.hold(self.conditioner.matrices("unet", scores))
        scaling = self.vae.config.scaling_factor
        latent = self.vae.encode(source).latent_dist.sample() * scaling
        eps = self.unet(latent, TIMESTEP, encoder_hidden_states=text).sample
        x0 = x0_from_eps(latent, eps, self.alpha_bar)
        return self.vae.decode(x0 / scaling).sample.clamp(-1, 1)

    def prepare(self, batch: dict) -> None:
        """Once per iteration: the generator's input (the LR upscaled to the HR size, bicubic as in the
        release's training data, in [-1, 1]), the estimator's scores on the LR, and the prompts' states."""
        if "source" in batch:
            return
        lr, hr = batch["lr"], batch["hr"]
        if hr.shape[-1] % self.latent_factor or hr.shape[-2] % self.latent_factor:
            raise UsageError(f"s3diff trains on HR crops whose sides are multiples of {self.latent_factor}, "
                             f"got {hr.shape[-2]}x{hr.shape[-1]}")
        upscaled = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic")
        batch["source"] = (upscaled * 2 - 1).clamp(-1, 1)
        with torch.no_grad():
            batch["scores"] = self.estimator(lr).float()
        batch["text"] = self.text

    def forward(self, batch: dict, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        self.prepare(batch)
        source, scores, text = batch["source"], batch["scores"], batch["text"]
        count = source.shape[0]
        if phase == "reconstruction":
            # Online negative prompting (drawn on the CPU as released: torch.rand(B).to(device)).
            negative = (torch.rand(count) < self.negative_prob).to(source.device)
            target = torch.where(negative[:, None, None, None], source, batch["hr"] * 2 - 1)
            output = self.generate(source, scores, text[negative.long()])
            l2 = F.mse_loss(output.float(), target.float()) * self.lambda_l2
            lpips = l2.new_zeros(()) if self.perceptual is None else self.perceptual(output, target) * self.lambda_lpips
            logs = {"loss_l2": l2.item(), "loss_lpips": lpips.item(),
                    "negative_fraction": negative.float().mean().item()}
            return l2 + lpips, logs
        if phase == "adversarial":
            output = self.generate(source, scores, text[:1].expand(count, -1, -1))
            batch["fake"] = output.detach()
            # Only the generator learns from this loss: the heads take no gradient here.
            loss = self.discriminator.loss(output, real=True, heads_trained=False).mean() * self.lambda_gan
            return loss, {"loss_gan_g": loss.item()}
        if phase == "discriminator":
            if "fake" not in batch:
                raise UsageError("the s3diff discriminator phase needs the adversarial phase's output first")
            real = self.discriminator.loss(batch["hr"] * 2 - 1, real=True).mean() * self.lambda_gan
            fake = self.discriminator.loss(batch["fake"], real=False).mean() * self.lambda_gan
            return real + fake, {"loss_gan_d_real": real.item(), "loss_gan_d_fake": fake.item()}
        raise UsageError(f"s3diff has no training phase {phase!r} (phases: reconstruction, adversarial, discriminator)")
