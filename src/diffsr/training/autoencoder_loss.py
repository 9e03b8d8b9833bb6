"""The LDM autoencoder training loss: L1 + LPIPS reconstruction and a PatchGAN with the hinge loss.

As CompVis latent-diffusion's `LPIPSWithDiscriminator` (taming-transformers' discriminator), which
StableSR trains its CFW layers with (configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml) and CCSR v1
its VAE decoder (configs/model/ccsr_stage2.yaml). Both releases set kl_weight 0 and never train the
loss's log-variance (it stays 0), so neither appears here; both use BatchNorm (use_actnorm False).

The adversarial weight is either adaptive (|grad rec| / |grad gan| at the generator's last layer, times
`disc_weight`) or fixed at `disc_weight`. The release code always tries the adaptive one and falls back
to the fixed one when the last layer takes no gradient: StableSR's decoder is frozen, hence its "fixed
0.025"; CCSR trains the decoder, hence adaptive x 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.training.losses import PerceptualLoss


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a stride-2 conv, `layers - 1` stride-2 conv+BatchNorm, one stride-1
    conv+BatchNorm, a 1-channel stride-1 conv; 4x4 kernels, LeakyReLU 0.2. Module names (`main.N`)
    are taming's, so `loss.discriminator.*` tensors of a release checkpoint load as they are."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        stack = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = width
        for n in range(1, layers + 1):
            out = width * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            stack += [nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                      nn.LeakyReLU(0.2, True)]
            channels = out
        stack.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*stack)
        self.apply(_init_weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.main(image)


def _init_weights(module: nn.Module) -> None:
    # taming's weights_init: conv weights N(0, 0.02) (biases keep torch's default), BatchNorm N(1, 0.02) / 0.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """`generator_loss` for the autoencoder's optimiser, `discriminator_loss` for the discriminator's.

    Images are in [-1, 1]. `step` is the optimiser step: the adversarial terms are off (factor 0) before
    `disc_start`."""

    def __init__(self, lpips_weights=None, disc_start: int = 501, disc_weight: float = 0.025,
                 disc_factor: float = 1.0, perceptual_weight: float = 1.0, adaptive_weight: bool = False,
                 disc_layers: int = 3):
        super().__init__()
        self.perceptual = PerceptualLoss(lpips_weights) if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(layers=disc_layers)
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor
        self.perceptual_weight = perceptual_weight
        self.adaptive_weight = adaptive_weight

    def factor(self, step: int) -> float:
        return self.disc_factor if step >= self.disc_start else 0.0

    def reconstruction_loss(self, target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        loss = (target - reconstruction).abs().mean()
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(reconstruction, target)
        # The release divides the batch mean by the batch size once more; kept so that loss scales match.
        return loss / target.shape[0]

    def adversarial_weight(self, rec_loss: torch.Tensor, gan_loss: torch.Tensor,
                           last_layer: torch.Tensor | None) -> torch.Tensor:
        # Without a graph (evaluation) the release's adaptive weight falls back to the fixed one too.
        if not self.adaptive_weight or not torch.is_grad_enabled():
            return torch.tensor(self.disc_weight, device=rec_loss.device)
        if last_layer is None or not last_layer.requires_grad:
            raise ValueError("the adaptive adversarial weight needs the generator's last layer, trainable")
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
        weight = (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
        return weight * self.disc_weight

    def generator_loss(self, target: torch.Tensor, reconstruction: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        rec_loss = self.reconstruction_loss(target, reconstruction)
        # The discriminator judges but does not learn here: run it on detached parameters (as Lightning's
        # toggling of its grads, without changing requires_grad during training).
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        gan_loss = -torch.func.functional_call(self.discriminator, frozen, (reconstruction,)).mean()
        factor = self.factor(step)
        # Before disc_start the adversarial term is multiplied by 0: skip the two extra backward passes.
        if factor > 0:
            weight = self.adversarial_weight(rec_loss, gan_loss, last_layer)
        else:
            weight = torch.zeros((), device=rec_loss.device)
        loss = rec_loss + weight * factor * gan_loss
        return loss, {"loss_rec": rec_loss.item(), "loss_gan": gan_loss.item(), "d_weight": float(weight),
                      "disc_factor": factor}

    def discriminator_loss(self, target: torch.Tensor, reconstruction: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        logits_real = self.discriminator(target.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        loss = self.factor(step) * hinge_discriminator_loss(logits_real, logits_fake)
        return loss, {"loss_disc": loss.item(), "logits_real": logits_real.mean().item(),
                      "logits_fake": logits_fake.mean().item()}
