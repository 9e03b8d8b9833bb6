"""CCSR stage 1: the ControlNet trained with the truncated-diffusion losses (paper Eq. 3), SD frozen.

As the v2 release trains it (branch CCSR-v2.0, train_ccsr_stage1.py), every sample of every batch gets
three equally weighted MSE terms on the HR latent z0:
- the usual eps loss at t drawn uniformly from {0, ..., t_max - 1}, t_max = round(1000 * 0.6667) = 667;
- l_T: x0 estimated at T = 999 from z0 noised to T, against z0;
- l_tmax: that estimate (gradients flow through it) noised to t_max, x0 estimated again, against z0.
The condition is the LR image resized back to the HR size (area, bilinear or bicubic, drawn at random),
rounded to 8 bits, through the VAE encoder (a posterior sample, times the scaling factor); the prompt is empty.
The ControlNet (with its condition conv) trains; the UNet, VAE and text encoder are frozen.
Differences from the release, minor: the resize-back mode is drawn from torch's RNG (the release: Python's
`random`), as every draw here must be for exact resume; the LR reaches the trainer already clamped to [0, 1]
(the release clamps only after resizing back).

v1 (branch CCSR-v1.0) alternates two optimisers on the same ControlNet: the eps loss, then l_T + l_tmax + the
eps loss at t_max; only the v2 form is trained here. The release's stage 1 starts from a ControlNet
pre-trained with the plain eps loss over all 1000 steps (train_controlnet.py): `pretrain=True` is that run.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.checkpoints import ccsr_v2
from diffsr.errors import BaseModelError, UsageError
from diffsr.methods.ccsr import CCSR
from diffsr.samplers import TRUNCATED_START_T as START_T, alpha_bar_at, q_sample, x0_from_eps
from diffsr.training.base import Trainer, trainable

T_MAX = 0.6667  # train_ccsr_stage1.sh --t_max
RESIZE_BACK_MODES = ("area", "bilinear", "bicubic")  # dataloaders/realesrgan.py, resize_bak


def eps_loss(model, z0: torch.Tensor, alphas_cumprod: torch.Tensor, t_end: int) -> torch.Tensor:
    """The usual diffusion loss: MSE between the noise and its prediction at t uniform in {0, ..., t_end - 1}."""
    z0 = z0.float()
    noise = torch.randn_like(z0)
    t = torch.randint(0, t_end, (z0.shape[0],), device=z0.device)
    return F.mse_loss(model(q_sample(z0, noise, alpha_bar_at(alphas_cumprod, t, z0)), t).float(), noise)


def truncated_losses(model, z0: torch.Tensor, alphas_cumprod: torch.Tensor, t_max: int,
                     start_t: int = START_T, start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three stage-1 terms for the latents `z0`: {"eps", "x0_T", "x0_tmax"} (each a mean square error).

    `model(x, t) -> eps` with t a (B,) long tensor of original timesteps; `start` is the latent noised to
    `start_t` for l_T (z0 itself in the release's stage 1). Noise and timesteps come from torch's global RNG,
    drawn in the release's order."""
    z0 = z0.float()
    loss_eps = eps_loss(model, z0, alphas_cumprod, t_max)
    T = torch.full((z0.shape[0],), start_t, device=z0.device, dtype=torch.long)
    tau = torch.full((z0.shape[0],), t_max, device=z0.device, dtype=torch.long)
    a_T, a_tau = alpha_bar_at(alphas_cumprod, T, z0), alpha_bar_at(alphas_cumprod, tau, z0)
    # l_T: one step from T straight to x0.
    x_T = q_sample(z0 if start is None else start.float(), torch.randn_like(z0), a_T)
    x0_T = x0_from_eps(x_T, model(x_T, T).float(), a_T)
    # l_tmax: the same constraint on the estimate re-noised to t_max (gradients flow through it).
    x_tau = q_sample(x0_T, torch.randn_like(z0), a_tau)
    x0_tau = x0_from_eps(x_tau, model(x_tau, tau).float(), a_tau)
    return {"eps": loss_eps, "x0_T": F.mse_loss(x0_T, z0), "x0_tmax": F.mse_loss(x0_tau, z0)}


def resize_back(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The LR images at the HR size as the release's data loader makes them: each resized with an
    interpolation mode drawn at random, then clamped and rounded to 8 bits."""
    modes = torch.randint(len(RESIZE_BACK_MODES), (lr.shape[0],)).tolist()
    up = torch.cat([F.interpolate(lr[i:i + 1].float(), size=size, mode=RESIZE_BACK_MODES[m]) for i, m in enumerate(modes)])
    return torch.clamp(torch.round(up * 255), 0, 255) / 255


class CCSRStage1(Trainer):
    method = "ccsr"
    stage = 1
    phases = (("controlnet", "controlnet"),)

    def __init__(self, model: CCSR, t_max: float = T_MAX, prompt: str = "", start_from_lr: bool = False,
                 pretrain: bool = False):
        """`model`: a CCSR-v2 model to train (CCSR.for_training: from a release folder, e.g. the release's
        pre-trained ControlNet, or a fresh ControlNet copied from the UNet). `start_from_lr`: noise the LR latent,
        not the HR one, to T for l_T (the release's --is_start_lr, off in stage 1). `pretrain`: only the eps loss
        over all 1000 steps (the release's train_controlnet.py)."""
        super().__init__()
        if isinstance(t_max, bool) or not isinstance(t_max, numbers.Real) or not 1 <= round(1000 * t_max) < START_T:
            raise UsageError(f"t_max must be a fraction of the 1000 timesteps, at least 0.001 and below T = {START_T}, "
                             f"got {t_max!r}")
        backbone = model.backbone
        if backbone.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise BaseModelError(f"{backbone.folder}: CCSR trains on an epsilon-prediction base (SD 2.1-base), this one "
                                 f"predicts {backbone.scheduler_config['prediction_type']}")
        self.model = model
        self.unet, self.vae, self.text_encoder = backbone.unet, backbone.vae, backbone.text_encoder
        self.controlnet = model.controlnet
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.controlnet.requires_grad_(True).train()
        self.t_max = round(len(backbone.alphas_cumprod) * t_max)
        self.start_from_lr = start_from_lr
        self.pretrain = pretrain
        self.register_buffer("alphas_cumprod", backbone.alphas_cumprod.float(), persistent=False)
        self.register_buffer("text", backbone.encode_prompt([prompt]), persistent=False)

    @classmethod
    def from_config(cls, config) -> "CCSRStage1":
        return cls(CCSR.for_training(config.base, config.weights), **cls.method_args(config))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"controlnet": trainable(self.controlnet)}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def released_frozen(self) -> list[nn.Module]:
        return [self.vae]  # the v2 folder holds it whole

    def enable_gradient_checkpointing(self) -> None:
        # The frozen UNet too: the gradient reaches the ControlNet through its activations.
        self.controlnet.enable_gradient_checkpointing()
        self.unet.enable_gradient_checkpointing()

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1] -> a VAE posterior sample times the scaling factor."""
        posterior = self.vae.encode((image * 2 - 1).to(self.vae.dtype)).latent_dist
        return posterior.sample().float() * self.vae.config.scaling_factor

    def eps_model(self, condition: torch.Tensor):
        """model(x, t) -> eps: the method's denoiser (ControlNet + UNet) on the condition latents, empty prompt."""
        text = self.text.expand(condition.shape[0], -1, -1)
        return lambda x, t: self.model.denoise(x, condition, text, t)

    def forward(self, batch: dict, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        hr = batch["hr"]
        z0 = self.encode(hr)
        condition = self.encode(resize_back(batch["lr"], hr.shape[-2:]))
        model = self.eps_model(condition)
        if self.pretrain:
            loss = eps_loss(model, z0, self.alphas_cumprod, len(self.alphas_cumprod))
            return loss, {"loss": loss.item(), "loss_eps": loss.item()}
        losses = truncated_losses(model, z0, self.alphas_cumprod, self.t_max,
                                  start=condition if self.start_from_lr else None)
        loss = losses["eps"] + losses["x0_T"] + losses["x0_tmax"]
        return loss, {"loss": loss.item(), **{f"loss_{name}": value.item() for name, value in losses.items()}}

    def upscaler(self) -> CCSR:
        return self.model

    def save_release(self, folder: Path) -> list[Path]:
        """The v2 release folder: controlnet/ (trained) and vae/ (the VAE this stage ran with, at its float32 values
        under mixed precision; stage 2 replaces it)."""
        with self.float32_frozen():
            return ccsr_v2.write(ccsr_v2.Parts(self.controlnet, self.vae), Path(folder))
