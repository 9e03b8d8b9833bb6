"""DEResNet: the degradation estimator S3Diff borrows from MM-RealSR (weights `de_net.pth`).

Two identical branches, one per degradation (blur, noise). Each is a plain ResNet without
normalisation followed by global average pooling and a small MLP with a sigmoid, so each score
lies in [0, 1]. Parameter names follow the release so `de_net.pth` loads strictly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffsr.checkpoints.s3diff import read_de_net
from diffsr.errors import WeightsError


class ResidualBlock(nn.Module):
    """x + conv2(relu(conv1(x))), 3x3 convolutions, no normalisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


def _branch_body(feats, blocks, downscales) -> nn.Sequential:
    """Stages of residual blocks; a stride-2 conv closes a stage that downscales, and a 3x3 conv
    widens the features where the next stage is wider (the release's layer order and indices)."""
    layers = []
    for stage, (width, count, down) in enumerate(zip(feats, blocks, downscales)):
        layers += [ResidualBlock(width) for _ in range(count)]
        next_width = feats[min(stage + 1, len(feats) - 1)]
        if down == 2:
            layers.append(nn.Conv2d(width, next_width, 3, 2, 1))
        elif down == 1 and next_width != width:
            layers.append(nn.Conv2d(width, next_width, 3, 1, 1))
        elif down != 1:
            raise ValueError(f"downscale {down} is not supported (1 or 2)")
    return nn.Sequential(*layers)


class DEResNet(nn.Module):
    """Image in [0, 1] (B, 3, H, W) -> degradation scores (B, 2) = (blur, noise) in [0, 1]."""

    def __init__(self, in_channels: int = 3, num_degradation: int = 2, feats=(64, 64, 64, 128),
                 blocks=(2, 2, 2, 2), downscales=(1, 1, 2, 1)):
        super().__init__()
        self.conv_first = nn.ModuleList(nn.Conv2d(in_channels, feats[0], 3, 1, 1) for _ in range(num_degradation))
        self.body = nn.ModuleList(_branch_body(feats, blocks, downscales) for _ in range(num_degradation))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(feats[-1], 512), nn.ReLU(), nn.Linear(512, 1), nn.Sigmoid())
            for _ in range(num_degradation))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        scores = []
        for first, body, head in zip(self.conv_first, self.body, self.fc_degree):
            features = body(first(image)).mean(dim=(2, 3))
            scores.append(head(features).squeeze(-1))
        return torch.stack(scores, dim=1)


def load_de_net(path: str | Path) -> DEResNet:
    """Build DEResNet from `de_net.pth` (a plain state dict), strictly: every tensor must fit."""
    state = read_de_net(path)
    net = DEResNet()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        problem = (f"missing {len(missing)} tensors (e.g. '{missing[0]}')" if missing
                   else f"{len(unexpected)} unexpected entries (e.g. '{unexpected[0]}')")
        raise WeightsError(f"{path}: not DEResNet degradation estimator weights: {problem}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise WeightsError(f"{path}: '{key}' has shape {shape}, DEResNet needs {tuple(expected[key].shape)}")
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)
