"""OSEDiff training: one-step generator with LoRA, distilled by variational score distillation (VSD).

Loss = 1 * MSE + 2 * LPIPS on the image + 1 * VSD on the latent (cswry/OSEDiff train_osediff.py). VSD compares
a regularizer UNet (the base with its own LoRA, trained to follow the generator's outputs) with the frozen base
UNet under classifier-free guidance, at a random t in [20, 980):
    w = mean |x0 - x0_frozen|,  grad = (x0_regularizer - x0_frozen) / w,  loss = MSE(x0, (x0 - grad).detach()).
The regularizer's own step is the usual eps-MSE on the generator's (detached) latents at t in [0, 1000).

Differences from the release, on purpose:
- all three regularizer adapters are active (the release adds three and leaves only the last one active);
- the frozen teacher is the regularizer UNet with its adapters switched off, not a second copy of the base
  (the same numbers, one UNet less in memory).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from diffsr.backbone import load_backbone
from diffsr.checkpoints import osediff as checkpoint
from diffsr.checkpoints.osediff import UNET_ADAPTERS
from diffsr.lora import add_lora
from diffsr.methods.osediff import OSEDiff, attach, fresh_adapters
from diffsr.prompts import compose_prompt, load_tagger
from diffsr.samplers import alpha_bar_at, guide, q_sample, x0_from_eps
from diffsr.training.base import Trainer, trainable
from diffsr.training.losses import PerceptualLoss

# train_osediff.sh's --neg_prompt: the teacher's unconditional branch in VSD.
NEGATIVE_PROMPT = ("painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, "
                   "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
                   "jpeg artifacts, deformed, lowres, over-smooth")
VSD_TIMESTEPS = (20, 980)  # torch.randint bounds, as released


def vsd_loss(x0: torch.Tensor, x0_regularizer: torch.Tensor, x0_frozen: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient in x0 is 2/N * (x0_regularizer - x0_frozen) / w (N = x0.numel()), w per sample."""
    weight = (x0 - x0_frozen).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (x0_regularizer - x0_frozen) / weight
    return F.mse_loss(x0, (x0 - grad).detach())


@contextmanager
def adapters_off(unet):
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class OSEDiffTrainer(Trainer):
    method = "osediff"
    phases = (("generator", "generator"), ("regularizer", "regularizer"))

    def __init__(self, base, weights=None, lora_rank: int = 4, lambda_mse: float = 1.0, lambda_lpips: float = 2.0,
                 lambda_vsd: float = 1.0, lambda_regularizer: float = 1.0, cfg_vsd: float = 7.5, prompt: str = "",
                 negative_prompt: str = NEGATIVE_PROMPT, tagger=None, lpips_weights=None):
        super().__init__()
        self.backbone = backbone = load_backbone(base)
        self.lambdas = dict(mse=lambda_mse, lpips=lambda_lpips, vsd=lambda_vsd, regularizer=lambda_regularizer)
        self.cfg_vsd, self.prompt = cfg_vsd, prompt
        # The teacher (and, with adapters on, the regularizer): the base UNet before the generator's changes.
        self.regularizer_unet = copy.deepcopy(backbone.unet)
        if weights is None:
            targets = fresh_adapters(backbone, lora_rank)
        else:  # fine-tune released or earlier weights
            parts = checkpoint.read(weights)
            attach(backbone, parts)
            targets = parts.targets
        self.osediff = OSEDiff(backbone, load_tagger(tagger), targets=targets)  # the generator
        for adapter, modules in zip(UNET_ADAPTERS, checkpoint.unet_targets(self.regularizer_unet)):
            add_lora(self.regularizer_unet, modules, lora_rank, adapter)
        self.regularizer_unet.set_adapter(list(UNET_ADAPTERS))
        self.unet, self.vae, self.text_encoder = backbone.unet, backbone.vae, backbone.text_encoder
        self.requires_grad_(False)
        for module in (self.unet, self.vae.encoder, self.vae.quant_conv, self.regularizer_unet):
            for name, param in module.named_parameters():
                param.requires_grad_("lora" in name)
        self.unet.conv_in.requires_grad_(True)  # the release trains conv_in's base weight too
        self.perceptual = PerceptualLoss(lpips_weights) if lambda_lpips else None  # no weights needed without it
        self.register_buffer("alphas_cumprod", backbone.alphas_cumprod.float(), persistent=False)
        # The prompt (without tags) and the negative prompt are constant: encoded once.
        self.register_buffer("prompt_text", backbone.encode_prompt([prompt]).float(), persistent=False)
        self.register_buffer("negative_text", backbone.encode_prompt([negative_prompt]).float(), persistent=False)

    # -- the contract ----------------------------------------------------------------------------------
    def parameter_groups(self):
        return {"generator": trainable(self.unet, self.vae), "regularizer": trainable(self.regularizer_unet)}

    def frozen_modules(self):
        return {"text_encoder": self.text_encoder, "vae_decoder": self.vae.decoder,
                "vae_post_quant_conv": self.vae.post_quant_conv,
                **({"perceptual": self.perceptual} if self.perceptual is not None else {})}

    def enable_gradient_checkpointing(self):
        for model in (self.unet, self.regularizer_unet, self.vae):
            model.enable_gradient_checkpointing()

    def forward(self, batch: dict, phase: str):
        if phase == "generator":
            return self.generator_loss(batch)
        return self.regularizer_loss(batch)

    def upscaler(self):
        return self.osediff

    def save_release(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / OSEDiff.weights_name
        checkpoint.write(self.osediff.release_parts(), file)
        return [file]

    # -- losses ----------------------------------------------------------------------------------------
    def texts(self, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (tags of the HR image when a tagger is set, as the release's RAM captions) and
        the negative prompt's."""
        tagger = self.osediff.tagger
        if tagger is None:
            text = self.prompt_text.expand(len(hr), -1, -1)
        else:
            text = self.backbone.encode_prompt([compose_prompt(self.prompt, tags) for tags in tagger(hr)]).float()
        return text, self.negative_text.expand_as(text)

    def generator_loss(self, batch: dict):
        hr = batch["hr"] * 2 - 1
        lr_up = F.interpolate(batch["lr"], size=hr.shape[-2:], mode="bicubic", align_corners=False) * 2 - 1
        text, negative = self.texts(batch["hr"])
        # The method's one-step core on whole tensors; the release samples the posterior (torch's global generator).
        x0, image = self.osediff.one_step(lr_up.clamp(-1, 1), text, lambda posterior: posterior.sample())
        mse = F.mse_loss(image.float(), hr.float())
        lpips = self.perceptual(image, hr) if self.perceptual is not None else mse.new_zeros(())
        vsd = self.vsd(x0.float(), text, negative)
        batch["latent"], batch["text"] = x0.detach(), text  # the regularizer learns from these next
        loss = self.lambdas["mse"] * mse + self.lambdas["lpips"] * lpips + self.lambdas["vsd"] * vsd
        return loss, {"loss": loss.item(), "loss_mse": mse.item(), "loss_lpips": lpips.item(), "loss_vsd": vsd.item()}

    def vsd(self, x0: torch.Tensor, text: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        t = torch.randint(*VSD_TIMESTEPS, (len(x0),), device=x0.device)
        alpha_bar = alpha_bar_at(self.alphas_cumprod, t, x0)
        noisy = q_sample(x0, torch.randn_like(x0), alpha_bar)
        unet = self.regularizer_unet
        with torch.no_grad():
            x0_regularizer = x0_from_eps(noisy, unet(noisy, t, text).sample.float(), alpha_bar)
            with adapters_off(unet):  # the frozen base, guided by the negative prompt (one batch, negative rows first)
                eps = guide(lambda x, texts: unet(x, t.repeat(len(x) // len(t)), texts).sample.float(), noisy, text,
                            negative, self.cfg_vsd)
            x0_frozen = x0_from_eps(noisy, eps, alpha_bar)
        return vsd_loss(x0, x0_regularizer, x0_frozen)

    def regularizer_loss(self, batch: dict):
        latent = batch["latent"]
        noise = torch.randn_like(latent)
        t = torch.randint(0, len(self.alphas_cumprod), (len(latent),), device=latent.device)
        eps = self.regularizer_unet(q_sample(latent, noise, alpha_bar_at(self.alphas_cumprod, t, latent)), t, batch["text"]).sample
        loss = self.lambdas["regularizer"] * F.mse_loss(eps.float(), noise.float())
        return loss, {"loss_regularizer": loss.item()}
