"""OSEDiff's release format, osediff.pkl (what cswry/OSEDiff's train_osediff.py saves): the LoRA target lists of
the UNet (three adapters) and the VAE encoder (one), their ranks, and the trained tensors in peft's names."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import torch

from diffsr import checkpoints
from diffsr.errors import WeightsError

UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"
UNET_LISTS = tuple(f"unet_lora_{part}_modules" for part in ("encoder", "decoder", "others"))  # by UNET_ADAPTERS
_UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                  "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
_VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


@dataclass
class Targets:
    """Where the release's LoRA adapters sit, and their ranks (peft's alpha 8: scaling 8 / rank)."""

    unet: tuple[list[str], list[str], list[str]]  # by UNET_ADAPTERS: down blocks + conv_in, up blocks + conv_out, rest
    vae: list[str]  # the VAE encoder's
    rank_unet: int
    rank_vae: int

    @classmethod
    def release(cls, unet: torch.nn.Module, vae: torch.nn.Module, rank: int) -> "Targets":
        """The lists train_osediff.py makes for fresh adapters."""
        return cls(unet_targets(unet), vae_targets(vae), rank, rank)


@dataclass
class Parts:
    """What osediff.pkl holds."""

    targets: Targets
    unet_state: dict  # the UNet's LoRA tensors and conv_in's base weight (trained too): see is_unet_tensor
    vae_state: dict  # the VAE encoder's LoRA tensors


def is_unet_tensor(name: str) -> bool:
    """conv_in is LoRA-wrapped AND its base weight is trained: the file holds both."""
    return "lora" in name or "conv_in" in name


def is_vae_tensor(name: str) -> bool:
    return "lora" in name


def unet_targets(unet: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """The release's three UNet target lists: (down blocks + conv_in, up blocks + conv_out, the rest)."""
    encoder, decoder, others = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in _UNET_PATTERNS):
            continue
        module = name.replace(".weight", "")
        if "down_blocks" in name or "conv_in" in name:
            encoder.append(module)
        elif "up_blocks" in name or "conv_out" in name:
            decoder.append(module)
        else:
            others.append(module)
    return encoder, decoder, others


def vae_targets(vae: torch.nn.Module) -> list[str]:
    """The release's VAE-encoder target list. It appends a name once per matching pattern, so names repeat;
    kept as released because the list is stored in osediff.pkl."""
    modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in _VAE_PATTERNS:
            if pattern in name and "encoder" in name:
                modules.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                modules.append(name.replace(".weight", ""))
    return modules


def parts_of(unet: torch.nn.Module, vae: torch.nn.Module, targets: Targets) -> Parts:
    """The Parts of a UNet and VAE that carry the release's adapters at `targets` (float32 copies on the CPU)."""
    def copy(model, wanted):
        return {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items() if wanted(k)}
    return Parts(targets, copy(unet, is_unet_tensor), copy(vae, is_vae_tensor))


def detect(state_or_path: dict | str | Path) -> bool:
    """Whether a weights dict (or the file at a path) is in osediff.pkl's format."""
    state = state_or_path if isinstance(state_or_path, dict) else checkpoints.read_weights(state_or_path)
    return checkpoints.detect(state) == "osediff"


def read(path: str | Path) -> Parts:
    """osediff.pkl's Parts; a file in another format, or with a missing or malformed entry, is one WeightsError line."""
    state = checkpoints.read_method_weights(path, "osediff")
    missing = [key for key in (*UNET_LISTS, "vae_lora_encoder_modules", "rank_unet", "rank_vae") if key not in state]
    if missing:
        raise WeightsError(f"{path}: an osediff file without '{missing[0]}'")
    lists = [state[key] for key in (*UNET_LISTS, "vae_lora_encoder_modules")]
    if not all(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names) for names in lists):
        raise WeightsError(f"{path}: its LoRA target lists are not lists of module names")
    ranks = state["rank_unet"], state["rank_vae"]
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise WeightsError(f"{path}: its LoRA ranks {ranks} are not positive whole numbers")
    for key in ("state_dict_unet", "state_dict_vae"):
        if not isinstance(state[key], dict) or not all(isinstance(v, torch.Tensor) for v in state[key].values()):
            raise WeightsError(f"{path}: '{key}' is not a dict of tensors")
    targets = Targets(tuple(list(names) for names in lists[:3]), list(lists[3]), int(ranks[0]), int(ranks[1]))
    return Parts(targets, state["state_dict_unet"], state["state_dict_vae"])


def write(parts: Parts, path: str | Path) -> None:
    """osediff.pkl with the release's keys (it loads in the authors' code as in ours)."""
    targets = parts.targets
    torch.save({"vae_lora_encoder_modules": list(targets.vae),
                **{key: list(names) for key, names in zip(UNET_LISTS, targets.unet)},
                "rank_unet": targets.rank_unet, "rank_vae": targets.rank_vae,
                "state_dict_unet": parts.unet_state, "state_dict_vae": parts.vae_state}, path)
