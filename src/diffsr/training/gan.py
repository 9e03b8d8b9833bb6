"""The vision-aided GAN discriminator S3Diff trains with: heads on a frozen DINO ViT, multi-level sigmoid loss.

What the release uses is `vision_aided_loss.Discriminator(cv_type='dino', output_type='conv_multi_level',
loss_type='multilevel_sigmoid_s')` (nupurkmr9/vision-aided-gan, PyPI vision-aided-loss 0.1.0):
- backbone: DINO ViT-B/16 (torch.hub `dino_vitb16`), frozen, in eval mode; here transformers'
  `ViTModel` (`facebook/dino-vitb16`) with DINO's LayerNorm eps 1e-6 (the transformers port says 1e-12);
- input: DiffAugment (color, translation, cutout) on the [-1, 1] image, then x/2 + 1/2, 'area' resize to
  224 x 224, normalised with CLIP's mean and ImageNet's std (as released);
- features: the outputs of the last 8 blocks, each through the final LayerNorm, of which the 1st, 5th and
  8th are used (blocks 5, 9 and 12 of 12): patch tokens of the first two as 14 x 14 maps, the class token
  of the last;
- heads: per map, blur -> spectral-norm conv 3x3 stride 2 (-> 128) -> LeakyReLU(0.2) -> blur -> spectral-norm
  conv 1x1 stride 2 (-> 1): a 3 x 3 logit map; on the class token, spectral-norm linear (-> 128) ->
  LeakyReLU(0.2) -> spectral-norm linear (-> 1);
- loss per image: sum over the three levels of the mean binary cross-entropy with logits against 0.8
  (real; also the generator's target) or 0 (fake).

The heads, blur and DiffAugment are written here because the vision_aided_loss package needs torchvision,
timm, CLIP and antialiased_cnns; module names follow its `MultiLevelDViT` so its state dicts load as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from diffsr.errors import WeightsError, first_line

DINO = "facebook/dino-vitb16"  # the ViT-B/16 DINO weights vision_aided_loss loads from torch.hub
DINO_LAYER_NORM_EPS = 1e-6  # DINO's own LayerNorm eps (vision_transformer.py)
INPUT_SIZE = 224
# CLIP's mean with ImageNet's std: what vision_aided_loss's DINO wrapper normalises with.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.229, 0.224, 0.225)
HEAD_CHANNELS = 128
REAL_TARGET = 0.8  # 'multilevel_sigmoid_s': one-sided label smoothing
AUGMENT_POLICY = ("color", "translation", "cutout")


def load_dino(name: str | Path = DINO):
    """The frozen DINO ViT from a transformers hub id or a local folder (no pooler)."""
    from transformers import ViTModel

    from diffsr.backbone import quiet_loading

    from diffsr.weights import hub_folder, looks_like_path

    if isinstance(name, str) and not looks_like_path(name):  # a hub id: diffsr.weights fetches it (or the cache)
        name = hub_folder(name, ["config.json"], ["model.safetensors"], "the DINO backbone of S3Diff's discriminator")
    try:
        with quiet_loading():
            model = ViTModel.from_pretrained(str(Path(name).expanduser()), add_pooling_layer=False,
                                             layer_norm_eps=DINO_LAYER_NORM_EPS)
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot load the DINO backbone {str(name)!r} of S3Diff's discriminator "
                           f"({first_line(error)}); offline, download {DINO} first or pass "
                           "dino=<local folder with config.json and the weights>") from None
    return model.eval().requires_grad_(False)


# -- DiffAugment (Zhao et al. 2020), as vision_aided_loss applies it; all randomness from torch's global RNG --

def _color(x: torch.Tensor) -> torch.Tensor:
    def draw():
        return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)

    x = x + (draw() - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (draw() * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (draw() + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio x its size; uncovered pixels are zero."""
    batch, _, height, width = x.shape
    shift_h, shift_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-shift_h, shift_h + 1, size=[batch, 1, 1], device=x.device)
    dx = torch.randint(-shift_w, shift_w + 1, size=[batch, 1, 1], device=x.device)
    # Index a zero-bordered copy: source row i + dy (+1 for the border), clamped onto the border.
    rows = (torch.arange(height, device=x.device)[None, :, None] + dy + 1).clamp(0, height + 1)
    cols = (torch.arange(width, device=x.device)[None, None, :] + dx + 1).clamp(0, width + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    images = torch.arange(batch, device=x.device)[:, None, None]
    return padded[images, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one rectangle of ratio x the size per image, centred anywhere in the image."""
    batch, _, height, width = x.shape
    size_h, size_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    centre_y = torch.randint(0, height + (1 - size_h % 2), size=[batch, 1, 1], device=x.device)
    centre_x = torch.randint(0, width + (1 - size_w % 2), size=[batch, 1, 1], device=x.device)
    top, left = centre_y - size_h // 2, centre_x - size_w // 2
    rows = torch.arange(height, device=x.device)[None, :, None]
    cols = torch.arange(width, device=x.device)[None, None, :]
    inside = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    return x * (~inside).to(x.dtype)[:, None]


def diff_augment(x: torch.Tensor) -> torch.Tensor:
    """'color,translation,cutout' DiffAugment of (B, 3, H, W) images, differentiable in x."""
    return _cutout(_translation(_color(x))).contiguous()


# -- discriminator -----------------------------------------------------------------------------------

class Blur(nn.Module):
    """[1 3 3 1] x [1 3 3 1] / 64 depthwise blur, stride 1, zero padding `pad` on every side (BlurPool's)."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("filt", (kernel / kernel.sum())[None, None].repeat(channels, 1, 1, 1))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [self.pad] * 4), self.filt.to(x.dtype), groups=x.shape[1])


class MultiLevelHeads(nn.Module):
    """Two conv heads on patch-token maps and one linear head on the class token (names as MultiLevelDViT)."""

    def __init__(self, channels: int, hidden: int = HEAD_CHANNELS):
        super().__init__()
        self.decoder = nn.ModuleList([
            nn.Sequential(
                Blur(channels, pad=2),
                spectral_norm(nn.Conv2d(channels, hidden, kernel_size=3, stride=2)),
                nn.LeakyReLU(0.2),
                Blur(hidden, pad=1),
                spectral_norm(nn.Conv2d(hidden, 1, kernel_size=1, stride=2)),
            ) for _ in range(2)
        ])
        self.decoder.append(nn.Sequential(spectral_norm(nn.Linear(channels, hidden)), nn.LeakyReLU(0.2)))
        self.out = spectral_norm(nn.Linear(hidden, 1))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """[map, map, class token] -> logits [(B, h, w), (B, h, w), (B, 1)]."""
        maps = [self.decoder[i](features[i]).squeeze(1) for i in range(2)]
        return maps + [self.out(self.decoder[2](features[2].float()))]


class VisionAidedDiscriminator(nn.Module):
    """Trainable heads on a frozen DINO ViT; `loss(images, real)` is the release's per-image GAN loss."""

    def __init__(self, dino: nn.Module, augment: bool = True):
        super().__init__()
        self.dino = dino.eval().requires_grad_(False)
        self.heads = MultiLevelHeads(dino.config.hidden_size)
        self.augment = augment
        depth = dino.config.num_hidden_layers
        if depth < 8:
            raise WeightsError(f"the DINO backbone has {depth} blocks; the discriminator reads the last 8")
        # The 1st, 5th and 8th of the last 8 blocks (hidden_states[k] is the output of block k).
        self.layers = (depth - 7, depth - 3, depth)
        self.register_buffer("mean", torch.tensor(MEAN)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(STD)[:, None, None], persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.dino.eval()  # the backbone always runs as in inference
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[-1, 1] images -> [(B, C, g, g), (B, C, g, g), (B, C)] DINO features (after augmentation)."""
        if self.augment:
            images = diff_augment(images)
        x = F.interpolate(images * 0.5 + 0.5, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        hidden = self.dino(pixel_values=x.to(self.dino.dtype), output_hidden_states=True).hidden_states
        grid = INPUT_SIZE // self.dino.config.patch_size
        tokens = [self.dino.layernorm(hidden[k]) for k in self.layers]
        maps = [t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, grid, grid) for t in tokens[:2]]
        return maps + [tokens[2][:, 0]]

    def logits(self, images: torch.Tensor, heads_trained: bool = True) -> list[torch.Tensor]:
        """Per-level logits. With heads_trained False the heads take no gradient (the generator's step:
        only the image receives one)."""
        features = self.features(images)
        if heads_trained:
            return self.heads(features)
        detached = {name: p.detach() for name, p in self.heads.named_parameters()}
        return torch.func.functional_call(self.heads, detached, (features,))

    def loss(self, images: torch.Tensor, real: bool, heads_trained: bool = True) -> torch.Tensor:
        """(B,) multi-level sigmoid loss against 0.8 (real) or 0 (fake)."""
        total = 0
        for logits in self.logits(images, heads_trained):
            target = torch.full_like(logits, REAL_TARGET if real else 0.0)
            total = total + F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
        return total
