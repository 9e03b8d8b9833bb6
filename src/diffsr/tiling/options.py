"""The tiling knobs of one upscale call: `TilingOptions` (checked once) and `TILING_KNOBS`, their names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffsr.errors import UsageError
from diffsr.progress import Progress
from diffsr.tiling.aggregate import DEFAULT_OVERLAP, Denoiser, aggregate
from diffsr.tiling.budget import available_memory, denoiser_tile

TILING_KNOBS = ("tile_size", "tile_overlap", "vae_tile_size", "tile_batch", "max_memory", "release_gaussian")


@dataclass(frozen=True)
class TilingOptions:
    """How to split work that does not fit. Sizes are in latent pixels (8 image pixels each)."""

    tile_size: int | None = None  # denoiser tile; None: the method's default, shrunk to fit max_memory
    tile_overlap: int = DEFAULT_OVERLAP
    vae_tile_size: int | None = None  # VAE tile (and rows per band when tiled); None: from max_memory
    tile_batch: int = 1  # denoiser tiles per call
    max_memory: float | None = None  # GB of working memory (model weights not counted); None: from the device
    release_gaussian: bool = False  # the releases' off-centre Gaussian and square tiles, for parity
    # Where this call's work is reported (not a knob: `upscale` sets it from its `callback=`)
    progress: Progress | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_knobs(cls, knobs: dict) -> "TilingOptions":
        """Take the tiling knobs out of `knobs` (removing them) and check them."""
        given = {name: knobs.pop(name) for name in TILING_KNOBS if name in knobs}
        return cls(**{name: value for name, value in given.items() if value is not None}).checked()

    def checked(self) -> "TilingOptions":
        for name in ("tile_size", "vae_tile_size"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise UsageError(f"{name} {value} must be a positive multiple of 8 latent pixels")
        if self.tile_overlap < 0 or self.tile_overlap % 8:
            raise UsageError(f"tile_overlap {self.tile_overlap} must be a non-negative multiple of 8 latent pixels")
        if self.tile_size is not None and self.tile_overlap >= self.tile_size:
            raise UsageError(f"tile_size {self.tile_size} must be larger than tile_overlap {self.tile_overlap}")
        if self.tile_batch < 1:
            raise UsageError(f"tile_batch {self.tile_batch} must be at least 1")
        if self.max_memory is not None and self.max_memory <= 0:
            raise UsageError(f"max_memory {self.max_memory} GB must be positive")
        return self

    def budget_bytes(self, device: torch.device) -> float:
        if self.max_memory is not None:
            return self.max_memory * 1e9
        return available_memory(device)

    def denoiser_tile(self, default: int, unet: torch.nn.Module, device, dtype: torch.dtype) -> int:
        """The given tile size, else the method's default shrunk until a batch of tiles fits the budget."""
        if self.tile_size is not None:
            return self.tile_size
        fitting = denoiser_tile(self.budget_bytes(torch.device(device)), unet, dtype, self.tile_batch)
        return max(min(default, fitting), self.tile_overlap + 8)

    def aggregate(self, denoise: Denoiser, latent: torch.Tensor, condition: torch.Tensor | None, default_tile: int,
                  unet: torch.nn.Module) -> torch.Tensor:
        """`aggregate` with these options: the method gives its default tile size and its UNet (for sizing).
        Every method's denoiser passes come through here; each batch of tiles is reported to `progress`."""
        tile = self.denoiser_tile(default_tile, unet, latent.device, unet.dtype)
        return aggregate(denoise, latent, condition, tile, self.tile_overlap, self.tile_batch, self.release_gaussian,
                         self.progress)
