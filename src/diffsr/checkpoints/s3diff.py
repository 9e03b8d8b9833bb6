"""S3Diff's release files: `s3diff.pkl` (ArcticHare105/S3Diff `S3Diff.save_model`) and its degradation
estimator `de_net.pth` (MM-RealSR's DEResNet, a plain state dict), found beside s3diff.pkl by default.

s3diff.pkl holds the LoRA targets and ranks, the UNet's LoRA tensors and its fully trained conv_in, the VAE
encoder's LoRA tensors, and the degradation conditioner (its MLPs, block embeddings and the fixed Fourier
frequencies `w`) under the release's keys. `Parts.conditioner` holds the latter under the names of
diffsr.nets.s3diff_modulation.DegradationConditioner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffsr.checkpoints import detect as detect_method, find_beside, read_method_weights, read_weights
from diffsr.errors import UsageError, WeightsError

# What the release trains: peft target names for the UNet, a regex for the VAE encoder; ranks; adapter names.
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
RANK_UNET, RANK_VAE = 32, 16
UNET_ADAPTER, VAE_ADAPTER = "default", "vae_skip"
KEYS = ("unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet",
        "state_dict_vae", "state_dict_vae_de_mlp", "state_dict_unet_de_mlp", "state_dict_vae_block_mlp",
        "state_dict_unet_block_mlp", "state_dict_vae_fuse_mlp", "state_dict_unet_fuse_mlp", "w", "state_embeddings")
MLPS = ("de_mlp", "block_mlp", "fuse_mlp")
DE_NET_FILE = "de_net.pth"


def stored_by_unet(name: str) -> bool:
    """The UNet tensors the release stores: every LoRA tensor and the fully trained conv_in."""
    return "lora" in name or "conv_in" in name


def stored_by_vae(name: str) -> bool:
    return "lora" in name or "skip_conv" in name


@dataclass
class Parts:
    """What s3diff.pkl holds."""

    unet_targets: list[str]
    vae_targets: str | list[str]
    rank_unet: int
    rank_vae: int
    unet: dict  # the UNet's LoRA tensors (adapter "default") and conv_in
    vae: dict  # the VAE encoder's LoRA tensors (adapter "vae_skip")
    conditioner: dict  # the degradation conditioner's state dict

    @classmethod
    def of(cls, unet: nn.Module, vae: nn.Module, conditioner: nn.Module, unet_targets=UNET_TARGETS,
           vae_targets=VAE_TARGETS) -> "Parts":
        """The tensors the release stores, from a UNet and a VAE carrying its adapters and the conditioner."""
        return cls(unet_targets, vae_targets, conditioner.ranks["unet"], conditioner.ranks["vae"],
                   {k: v for k, v in unet.state_dict().items() if stored_by_unet(k)},
                   {k: v for k, v in vae.state_dict().items() if stored_by_vae(k)},
                   conditioner.state_dict())


def detect(state_or_path: dict | str | Path) -> bool:
    state = state_or_path if isinstance(state_or_path, dict) else read_weights(state_or_path)
    return detect_method(state) == "s3diff"


def read(path: str | Path) -> Parts:
    weights = read_method_weights(path, "s3diff")
    missing = [key for key in KEYS if key not in weights]
    if missing:
        raise WeightsError(f"{path}: s3diff weights without {', '.join(repr(k) for k in missing)} (incomplete file?)")
    conditioner = {"w": weights["w"]}
    for part in ("vae", "unet"):
        for mlp in MLPS:
            conditioner.update({f"{part}_{mlp}.{name}": value
                                for name, value in weights[f"state_dict_{part}_{mlp}"].items()})
        embedding = weights["state_embeddings"][f"state_dict_{part}_block"]
        conditioner.update({f"{part}_block_embeddings.{name}": value for name, value in embedding.items()})
    return Parts(weights["unet_lora_target_modules"], weights["vae_lora_target_modules"], weights["rank_unet"],
                 weights["rank_vae"], weights["state_dict_unet"], weights["state_dict_vae"], conditioner)


def write(parts: Parts, path: str | Path) -> Path:
    """s3diff.pkl in the release's layout (tensors as float32 on the CPU)."""
    def plain(state: dict) -> dict:
        return {k: v.detach().cpu().float() for k, v in state.items()}

    conditioner = plain(parts.conditioner)
    state = {"unet_lora_target_modules": parts.unet_targets, "vae_lora_target_modules": parts.vae_targets,
             "rank_unet": parts.rank_unet, "rank_vae": parts.rank_vae,
             "state_dict_unet": plain(parts.unet), "state_dict_vae": plain(parts.vae)}
    for mlp in MLPS:
        for part in ("vae", "unet"):
            prefix = f"{part}_{mlp}."
            state[f"state_dict_{part}_{mlp}"] = {k[len(prefix):]: v for k, v in conditioner.items()
                                                 if k.startswith(prefix)}
    state["w"] = nn.Parameter(conditioner["w"].clone(), requires_grad=False)  # the release pickles a Parameter
    state["state_embeddings"] = {f"state_dict_{part}_block": {"weight": conditioner[f"{part}_block_embeddings.weight"]}
                                 for part in ("vae", "unet")}
    torch.save(state, path)
    return Path(path)


def find_de_net(weights: str | Path | None, de_net: str | Path | None = None) -> Path:
    """`de_net`, else de_net.pth beside `weights`; one line when there is neither."""
    if de_net is not None:
        return Path(de_net)
    if weights is None:
        raise UsageError("s3diff needs its degradation estimator: pass de_net='de_net.pth' (--de-net, "
                         "method_args.de_net; the release's assets/mm-realsr/de_net.pth)")
    found = find_beside(weights, DE_NET_FILE)
    if found is None:
        raise WeightsError(f"{Path(weights).parent / DE_NET_FILE}: degradation estimator weights (de_net.pth) not "
                           "found; pass de_net= (--de-net) or put de_net.pth beside the weights file")
    return found


def read_de_net(path: str | Path) -> dict:
    """de_net.pth's state dict (not checked against the network: nets.de_net does that)."""
    state = read_weights(path)
    other = detect_method(state)
    if other is not None:
        raise WeightsError(f"{path}: this is {other} weights, not the degradation estimator (de_net.pth)")
    return state


def write_de_net(state: dict, path: str | Path) -> Path:
    torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
    return Path(path)
