"""LPIPS and DISTS on compact AlexNet/VGG16 feature stacks that load torchvision's weight files.

Written here because the reference packages (lpips, piq, pyiqa) need torchvision, which cannot be
installed beside diffusers on every machine. The layers are numbered as in torchvision's `features`
so its ImageNet files (`alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`) load unchanged; the LPIPS
linear heads and the DISTS alpha/beta come from the files pyiqa uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffsr.checkpoints import read_weights
from diffsr.errors import WeightsError
from diffsr.metrics.weights import weights_path

VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features` (indices 0-12)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 `features` (indices 0-30)."""
    layers, channels = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


def load_prefixed(module: nn.Module, state: dict, prefix: str, source: Path) -> None:
    """Load `module` from the entries of `state` under `prefix`; every parameter must be present."""
    own = module.state_dict()
    picked = {name: state[prefix + name] for name in own if prefix + name in state}
    missing = sorted(set(own) - set(picked))
    if missing:
        raise WeightsError(f"{source}: not the expected weights file ({len(missing)} tensors missing, "
                           f"e.g. {prefix}{missing[0]})")
    for name, tensor in picked.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise WeightsError(f"{source}: {prefix}{name} has shape {tuple(tensor.shape)}, "
                               f"expected {tuple(own[name].shape)}")
    module.load_state_dict(picked)


def unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018) with an AlexNet (pyiqa's default, StableSR's tables) or VGG16 trunk."""

    # index after the last layer of each of the five slices, and the slice widths
    SLICES = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
    CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in self.SLICES:
            raise ValueError(f"unknown LPIPS network {net!r} (choose alex or vgg)")
        self.net = net
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    @classmethod
    def from_files(cls, net: str, weights_dir=None, download: bool = True) -> "LPIPS":
        model = cls(net)
        head_file = weights_path(f"lpips_{net}", weights_dir, download)
        heads = read_weights(head_file)
        # pyiqa's head file holds `lin{i}.model.1.weight` (the original release's names); a file that
        # also carries the trunk (`net.slice{k}.{i}.*`) is used whole.
        trunk_keys = {k.split(".", 2)[2]: v for k, v in heads.items() if k.startswith("net.slice")}
        if trunk_keys:
            load_prefixed(model.features, trunk_keys, "", head_file)
        else:
            trunk_file = weights_path("alexnet" if net == "alex" else "vgg16", weights_dir, download)
            load_prefixed(model.features, read_weights(trunk_file), "features.", trunk_file)
        for i, lin in enumerate(model.lins):
            load_prefixed(lin, heads, f"lin{i}.model.1.", head_file)
        return model.eval()

    def layer_outputs(self, image: torch.Tensor) -> list[torch.Tensor]:
        outputs, start = [], 0
        for end in self.SLICES[self.net]:
            for index in range(start, end):
                image = self.features[index](image)
            outputs.append(image)
            start = end
        return outputs

    def forward(self, sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Per-image distance of (N, 3, H, W) tensors in [0, 1]."""
        sr = ((2 * sr - 1) - self.shift) / self.scale
        gt = ((2 * gt - 1) - self.shift) / self.scale
        total = 0
        for lin, a, b in zip(self.lins, self.layer_outputs(sr), self.layer_outputs(gt)):
            total = total + lin((unit_normalize(a) - unit_normalize(b)) ** 2).mean(dim=(2, 3))
        return total[:, 0]


class L2Pool(nn.Module):
    """DISTS's anti-aliased pooling: sqrt of a Hann-weighted (3x3, stride 2) average of squares."""

    def __init__(self, channels: int):
        super().__init__()
        hann = np.hanning(5)[1:-1]
        window = torch.tensor(hann[:, None] * hann[None, :], dtype=torch.float32)
        self.register_buffer("window", (window / window.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x**2, self.window, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020): VGG16 with L2 pooling; texture (mean) and structure (covariance) terms."""

    CHANNELS = (3, 64, 128, 256, 512, 512)
    POOLS = (4, 9, 16, 23)  # VGG max-pool positions replaced by L2 pooling
    STAGE_ENDS = (4, 9, 16, 23, 30)

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for index, channels in zip(self.POOLS, (64, 128, 256, 512)):
            self.features[index] = L2Pool(channels)
        total = sum(self.CHANNELS)
        self.alpha = nn.Parameter(torch.zeros(1, total, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, total, 1, 1))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @classmethod
    def from_files(cls, weights_dir=None, download: bool = True) -> "DISTS":
        model = cls()
        dists_file = weights_path("dists", weights_dir, download)
        dists = read_weights(dists_file)
        # The trunk comes from torchvision's VGG16 file, or from the DISTS file itself when it carries one
        # (as `stage{k}.{index}.*`, the names of the original DISTS module).
        trunk = {key.split(".", 1)[1]: value for key, value in dists.items() if key.startswith("stage")}
        trunk_file = dists_file
        if not trunk:
            trunk_file = weights_path("vgg16", weights_dir, download)
            trunk = {key[len("features."):]: value for key, value in read_weights(trunk_file).items()}
        convs = nn.ModuleDict({str(i): layer for i, layer in enumerate(model.features) if isinstance(layer, nn.Conv2d)})
        load_prefixed(convs, trunk, "", trunk_file)
        for name in ("alpha", "beta"):
            if name not in dists or tuple(dists[name].shape) != tuple(getattr(model, name).shape):
                raise WeightsError(f"{dists_file}: not a DISTS weights file (no {name} of shape "
                                   f"{tuple(getattr(model, name).shape)})")
            getattr(model, name).data.copy_(dists[name])
        return model.eval()

    def stage_outputs(self, image: torch.Tensor) -> list[torch.Tensor]:
        outputs, h, start = [image], (image - self.mean) / self.std, 0
        for end in self.STAGE_ENDS:
            for index in range(start, end):
                h = self.features[index](h)
            outputs.append(h)
            start = end
        return outputs

    def forward(self, sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Per-image distance of (N, 3, H, W) tensors in [0, 1]."""
        total = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total, self.CHANNELS, dim=1)
        betas = torch.split(self.beta / total, self.CHANNELS, dim=1)
        texture = structure = 0
        c1 = c2 = 1e-6
        for a, b, alpha, beta in zip(self.stage_outputs(sr), self.stage_outputs(gt), alphas, betas):
            mean_a, mean_b = a.mean(dim=(2, 3), keepdim=True), b.mean(dim=(2, 3), keepdim=True)
            similarity = (2 * mean_a * mean_b + c1) / (mean_a**2 + mean_b**2 + c1)
            texture = texture + (alpha * similarity).sum(1, keepdim=True)
            var_a = ((a - mean_a) ** 2).mean(dim=(2, 3), keepdim=True)
            var_b = ((b - mean_b) ** 2).mean(dim=(2, 3), keepdim=True)
            cov = (a * b).mean(dim=(2, 3), keepdim=True) - mean_a * mean_b
            structure = structure + (beta * (2 * cov + c2) / (var_a + var_b + c2)).sum(1, keepdim=True)
        return (1 - (texture + structure)).flatten()
