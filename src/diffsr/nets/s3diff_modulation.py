"""S3Diff's degradation-guided LoRA: the conditioner that turns degradation scores into the r x r matrices C
that modulate every LoRA layer (diffsr.lora), and which block of the VAE encoder / UNet each layer belongs to.

C = fuse_mlp(concat(de_mlp(fourier(scores)), block_mlp(block_embedding))), one per block, reshaped row-major
to r x r. Parameter names are the conditioner's own; checkpoints.s3diff maps them to the release's keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffsr.lora import LoraModulation, add_degradation_lora

UNET_BLOCKS, VAE_BLOCKS = 10, 6
FOURIER_SIZE = 64  # random frequencies per score; sin and cos of two scores -> 4 * 64 features
BLOCK_EMBEDDING_SIZE = 64
PARTS = ("vae", "unet")


def unet_block(name: str) -> int:
    """Block of a UNet LoRA layer: down_blocks.i -> i, mid_block -> 4, up_blocks.i -> 5 + i, conv_out -> 9."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return UNET_BLOCKS - 1


def vae_block(name: str) -> int:
    """Block of a VAE-encoder LoRA layer: encoder.down_blocks.i -> i, mid_block -> 4, conv_in/conv_out -> 5."""
    parts = name.split(".")
    if parts[1] == "down_blocks":
        return int(parts[2])
    if parts[1] == "mid_block":
        return VAE_BLOCKS - 2
    return VAE_BLOCKS - 1


def add_modulated_lora(vae: nn.Module, unet: nn.Module, vae_targets: str | list[str], unet_targets: list[str],
                       rank_vae: int, rank_unet: int, vae_adapter: str, unet_adapter: str
                       ) -> tuple[LoraModulation, LoraModulation]:
    """Wrap the targets of the VAE (encoder) and the UNet with degradation-guided LoRA (peft alpha 8, so the
    scaling is 8 / rank); returns their (vae, unet) modulations."""
    return (add_degradation_lora(vae, vae_targets, rank_vae, vae_adapter, vae_block),
            add_degradation_lora(unet, unet_targets, rank_unet, unet_adapter, unet_block))


class DegradationConditioner(nn.Module):
    """Degradation scores (B, 2) -> the LoRA matrices C, (B, blocks, r, r), for the VAE encoder and the UNet."""

    def __init__(self, rank_vae: int, rank_unet: int):
        super().__init__()
        self.ranks = {"vae": rank_vae, "unet": rank_unet}
        self.register_buffer("w", torch.zeros(FOURIER_SIZE))  # fixed random frequencies
        for part, blocks, rank in (("vae", VAE_BLOCKS, rank_vae), ("unet", UNET_BLOCKS, rank_unet)):
            setattr(self, f"{part}_de_mlp", nn.Sequential(nn.Linear(4 * FOURIER_SIZE, 256), nn.ReLU()))
            setattr(self, f"{part}_block_mlp", nn.Sequential(nn.Linear(BLOCK_EMBEDDING_SIZE, 64), nn.ReLU()))
            setattr(self, f"{part}_fuse_mlp", nn.Linear(256 + 64, rank * rank))
            setattr(self, f"{part}_block_embeddings", nn.Embedding(blocks, BLOCK_EMBEDDING_SIZE))

    def fourier(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B, 256): [sin, cos] of 2 pi score w, for blur then noise."""
        angles = scores[..., None] * self.w * 2 * math.pi
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)

    def matrices(self, part: str, scores: torch.Tensor) -> torch.Tensor:
        """C for every block of `part` ("vae" or "unet"): (B, blocks, r, r)."""
        degradation = getattr(self, f"{part}_de_mlp")(self.fourier(scores))  # (B, 256)
        blocks = getattr(self, f"{part}_block_mlp")(getattr(self, f"{part}_block_embeddings").weight)  # (n, 64)
        batch, count, rank = degradation.shape[0], blocks.shape[0], self.ranks[part]
        joint = torch.cat([degradation[:, None].expand(-1, count, -1), blocks[None].expand(batch, -1, -1)], dim=-1)
        return getattr(self, f"{part}_fuse_mlp")(joint).reshape(batch, count, rank, rank)

    def mlps(self) -> list[nn.Linear]:
        return [layer for part in PARTS for mlp in ("de_mlp", "block_mlp", "fuse_mlp")
                for layer in getattr(self, f"{part}_{mlp}").modules() if isinstance(layer, nn.Linear)]
