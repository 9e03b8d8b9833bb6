"""Losses shared by the trainers."""

from __future__ import annotations

import torch
from torch import nn

from diffsr.errors import WeightsError


class PerceptualLoss(nn.Module):
    """LPIPS (VGG16) as a loss on images in [-1, 1], as every method trains with (`lpips.LPIPS(net='vgg')`).

    Our compact LPIPS (diffsr.metrics.perceptual) because the lpips package needs torchvision. Its weights
    are the standard files (torchvision's vgg16-397923af.pth and LPIPS_v0.1_vgg-a78928a0.pth) looked up in
    `weights_dir`, $DIFFSR_METRIC_WEIGHTS or torch.hub's cache; nothing is downloaded during training."""

    def __init__(self, weights_dir=None):
        super().__init__()
        from diffsr.metrics.perceptual import LPIPS
        from diffsr.metrics.weights import CLI_FOLDER_HINT

        try:
            self.lpips = LPIPS.from_files("vgg", weights_dir, download=False).requires_grad_(False)
        except WeightsError as error:
            raise WeightsError(f"the LPIPS training loss needs its weights: {str(error).removesuffix(CLI_FOLDER_HINT)} "
                               "(or name their folder: method_args.lpips_weights, e.g. --set "
                               "method_args.lpips_weights=DIR; method_args.lambda_lpips: 0 trains without LPIPS)") from None

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS over the batch; gradients flow into `prediction`."""
        return self.lpips(prediction.float() * 0.5 + 0.5, target.float() * 0.5 + 0.5).mean()
