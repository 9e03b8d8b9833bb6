"""peft helpers: add the releases' LoRA adapters, load their tensors, merge them for speed."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from diffsr.errors import WeightsError


def add_lora(model: torch.nn.Module, target_modules: list[str], rank: int, adapter_name: str,
             lora_alpha: int = 8) -> None:
    """Wrap `target_modules` (full module names) with a peft LoRA adapter.

    peft's default alpha (8) is what every release trained with: scaling = alpha / rank.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    with warnings.catch_warnings():
        # peft warns on every second adapter of a model; several adapters per model is the release's design.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(config, adapter_name=adapter_name)


def load_lora_state(model: torch.nn.Module, state: dict, wanted: Callable[[str], bool], label: str) -> None:
    """Copy every parameter whose name `wanted` from `state`, checking that names and shapes fit."""
    for name, param in model.named_parameters():
        if not wanted(name):
            continue
        if name not in state:
            raise WeightsError(f"{label} has no '{name}': the file does not fit this base model")
        value = state[name]
        if value.shape != param.shape:
            raise WeightsError(f"{label}['{name}'] has shape {tuple(value.shape)} but the base model needs "
                               f"{tuple(param.shape)}: the weights were made for another base model")
        param.data.copy_(value)


def merge_lora(model: torch.nn.Module) -> None:
    """Fold every active LoRA adapter into its base weight (same output within float error, faster)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
