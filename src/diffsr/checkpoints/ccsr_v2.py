"""CCSR v2's release weights (csslc/CCSR, branch CCSR-v2.0): a folder with `controlnet/` (diffusers'
ControlNetModel plus the release's `use_vae_encode_condition` conv, diffsr.nets.ccsr_controlnet) and `vae/`
(the stage-2 VAE), both in the diffusers layout. Told from v1's one-file LDM checkpoint by being a folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffsr.backbone import quiet_loading
from diffsr.errors import WeightsError, first_line
from diffsr.nets.ccsr_controlnet import controlnet_class


@dataclass
class Parts:
    controlnet: nn.Module
    vae: nn.Module | None  # None: a folder with controlnet/ only (the pre-trained ControlNet stage 1 starts from)


def detect(path: str | Path) -> bool:
    """CCSR-v2 weights are a folder (v1's are one checkpoint file)."""
    return Path(path).is_dir()


def read(folder: str | Path, dtype: torch.dtype = torch.float32, need_vae: bool = True) -> Parts:
    """The folder's ControlNet and VAE; without `need_vae` a missing vae/ gives Parts.vae None."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: CCSR-v2 weights are a folder (controlnet/ + vae/), not a file")
    for part in ("controlnet", "vae") if need_vae else ("controlnet",):
        if not (folder / part / "config.json").is_file():
            raise WeightsError(f"{folder}: not a CCSR-v2 weights folder (missing {part}/config.json)")
    config = json.loads((folder / "controlnet" / "config.json").read_text())
    if not config.get("use_vae_encode_condition", False):
        raise WeightsError(f"{folder / 'controlnet'}: this ControlNet takes an image condition, not CCSR's VAE-latent "
                           "condition (use_vae_encode_condition is not set)")
    try:
        with quiet_loading():
            controlnet = controlnet_class().from_pretrained(folder, subfolder="controlnet", torch_dtype=dtype)
            vae = (AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
                   if (folder / "vae" / "config.json").is_file() else None)
    except (OSError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{folder}: cannot load the CCSR-v2 weights: {first_line(error)}") from None
    return Parts(controlnet, vae)


def write(parts: Parts, folder: str | Path) -> list[Path]:
    """Write the folder: controlnet/ and vae/, the ControlNet's config as the release's diffusers (0.21) writes
    it with its ControlNetModel class. Returns the files written."""
    folder = Path(folder)
    with quiet_loading():
        parts.controlnet.save_pretrained(folder / "controlnet")
        parts.vae.save_pretrained(folder / "vae")
    config_file = folder / "controlnet" / "config.json"
    config = json.loads(config_file.read_text())
    config.update({"_class_name": "ControlNetModel", "_diffusers_version": "0.21.0"})
    config_file.write_text(json.dumps(config, indent=2))
    return sorted(file for part in ("controlnet", "vae") for file in (folder / part).iterdir() if file.is_file())
