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

import inspect
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.backbone import load_backbone
from diffsr.checkpoints import s3diff as release
from diffsr.errors import UsageError
from diffsr.methods.s3diff import NEGATIVE_PROMPT, POSITIVE_PROMPT, S3Diff
from diffsr.nets.de_net import load_de_net
from diffsr.training.base import Trainer, trainable
from diffsr.training.gan import DINO, VisionAidedDiscriminator, load_dino
from diffsr.training.losses import PerceptualLoss

MLP_INIT_SCALE = 1e-5  # the release: basicsr default_init_weights(mlps, 1e-5), i.e. Kaiming normal x 1e-5


def initialise_as_release(conditioner: nn.Module) -> None:
    """As the release's S3Diff.__init__: w and the block embeddings standard normal, the MLPs Kaiming normal
    scaled by 1e-5 with zero biases (so C starts near zero)."""
    # w is fixed, not trained, so not in the loop's checkpoints: a fixed seed lets a resumed run rebuild it.
    conditioner.w.copy_(torch.randn(conditioner.w.shape, generator=torch.Generator().manual_seed(0)))
    for layer in conditioner.mlps():
        nn.init.kaiming_normal_(layer.weight)
        layer.weight.data.mul_(MLP_INIT_SCALE)
        nn.init.zeros_(layer.bias)


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

    def __init__(self, method: S3Diff, de_net: str | Path, dino=DINO, lpips_weights=None, lambda_l2=2.0,
                 lambda_lpips=5.0, lambda_gan=0.5, negative_prob=0.05, positive_prompt=POSITIVE_PROMPT,
                 negative_prompt=NEGATIVE_PROMPT, diff_augment=True):
        """Trains `method` (S3Diff.load to fine-tune a release, or a new one: see `build`) in place. `de_net`: the
        file of its degradation estimator (copied beside the release files). `dino`: transformers hub id or
        folder of the discriminator's DINO ViT."""
        super().__init__()
        self.method, self.de_net_path = method, Path(de_net)
        self.unet, self.vae, self.text_encoder = method.backbone.unet, method.backbone.vae, method.backbone.text_encoder
        self.conditioner, self.estimator = method.conditioner, method.estimator
        for module in (self.unet, self.vae, self.text_encoder, self.estimator):
            module.requires_grad_(False)
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
        self.register_buffer("text", method.backbone.encode_prompt([positive_prompt, negative_prompt]), persistent=False)
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def build(cls, base, weights=None, de_net=None, lora_rank_unet=None, lora_rank_vae=None, **options):
        """From files: `weights` (an s3diff.pkl) to fine-tune, its ranks kept; None: new adapters of the given
        ranks, initialised as the release does. `de_net`: by default de_net.pth beside `weights`."""
        de_net = release.find_de_net(weights, de_net)
        if weights is None:
            method = S3Diff(load_backbone(base), load_de_net(de_net),
                            (lora_rank_vae or release.RANK_VAE, lora_rank_unet or release.RANK_UNET))
            initialise_as_release(method.conditioner)
        else:
            method = S3Diff.load(base, weights, de_net=de_net)
            for name, given, stored in (("lora_rank_unet", lora_rank_unet, method.conditioner.ranks["unet"]),
                                        ("lora_rank_vae", lora_rank_vae, method.conditioner.ranks["vae"])):
                if given is not None and given != stored:
                    raise UsageError(f"{name} {given} differs from {weights}'s rank {stored} "
                                     "(leave it out to fine-tune)")
        return cls(method, de_net, **options)

    @classmethod
    def from_config(cls, config) -> "S3DiffTrainer":
        """`build(base, weights, **method_args)`, method_args checked by name first."""
        accepted = (set(inspect.signature(cls.build).parameters) | set(inspect.signature(cls).parameters)) - {
            "base", "weights", "method", "options"}
        unknown = sorted(set(config.method_args) - accepted)
        if unknown:
            raise UsageError(f"{cls.method} stage {cls.stage} has no method_args key {unknown[0]!r} "
                             f"(known: {', '.join(sorted(accepted))})")
        return cls.build(config.base, config.weights, **config.method_args)

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
        return self.method

    def save_release(self, folder: Path) -> list[Path]:
        """s3diff.pkl (the release's layout) and a copy of the estimator's de_net.pth beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = release.write(release.Parts.of(self.unet, self.vae, self.conditioner), folder / "s3diff.pkl")
        de_net = folder / release.DE_NET_FILE
        if de_net.resolve() != self.de_net_path.resolve():
            shutil.copyfile(self.de_net_path, de_net)
        return [weights, de_net]

    # -- the model -----------------------------------------------------------------------------------------
    def generate(self, source: torch.Tensor, scores: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The one-step SR output in [-1, 1] for `source` (the upscaled LR in [-1, 1]), degradation scores
        (B, 2) and text states (B, 77, d): the method's own step; the VAE posterior is sampled, as in the
        release's training."""
        return self.method.one_step(source, scores, lambda latent: self.method.noise(latent, text))

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
