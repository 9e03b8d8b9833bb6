"""peft helpers: add the releases' LoRA adapters, load their tensors, merge them for speed; S3Diff's
degradation-guided LoRA layers."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable

import torch

from diffsr.errors import UsageError, WeightsError


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


def load_lora_state(model: torch.nn.Module, state: dict, wanted: Callable[[str], bool], label: str,
                    complete: bool = False) -> None:
    """Copy every parameter whose name `wanted` from `state`, checking that names and shapes fit.
    `complete`: also every tensor in `state` must find its place."""
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
    if complete:
        names = {name for name, _ in model.named_parameters() if wanted(name)}
        unused = [key for key in state if key not in names]
        if unused:
            raise WeightsError(f"{label} has '{unused[0]}' (and {len(unused) - 1} more) that this base model "
                               "has no place for: the weights were made for another base model")


def merge_lora(model: torch.nn.Module) -> None:
    """Fold every active LoRA adapter into its base weight (same output within float error, faster)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()


# -- Degradation-guided LoRA (S3Diff) ---------------------------------------------------------------
# Each layer computes y = base(x) + s * B(A(x) C) where C (r x r, one per sample) comes from the
# image's degradation scores and the layer's block. C changes with every image, so the LoRA can never
# be folded into the base weights.


class LoraModulation:
    """The per-sample r x r matrices C for one model's degradation-guided LoRA layers.

    `matrices` is (N, blocks, r, r): N is 1 (shared by the whole batch, e.g. all tiles of one image)
    or the batch size of the next call. Set it around each forward pass with `use`.
    """

    def __init__(self):
        self.matrices: torch.Tensor | None = None

    @staticmethod
    def _checked(matrices: torch.Tensor) -> torch.Tensor:
        if matrices.dim() != 4 or matrices.shape[-1] != matrices.shape[-2]:
            raise ValueError(f"modulation matrices must be (N, blocks, r, r), got {tuple(matrices.shape)}")
        return matrices

    @contextmanager
    def use(self, matrices: torch.Tensor):
        previous, self.matrices = self.matrices, self._checked(matrices)
        try:
            yield self
        finally:
            self.matrices = previous

    def hold(self, matrices: torch.Tensor) -> None:
        """Set `matrices` until replaced (training: with gradient checkpointing the backward pass runs the
        layers again after the forward pass has returned, so a `use` block would have ended)."""
        self.matrices = self._checked(matrices)

    def matrix(self, block: int, batch: int) -> torch.Tensor:
        """(batch, r, r) for the layers of `block`."""
        if self.matrices is None:
            raise RuntimeError("degradation-guided LoRA called without its matrices: wrap the call in modulation.use(...)")
        count = self.matrices.shape[0]
        if count not in (1, batch):
            raise ValueError(f"modulation matrices for {count} samples, but the batch has {batch}")
        return self.matrices[:, block].expand(batch, -1, -1)


class _DegradationLoraMixin:
    """forward for peft LoRA layers with C between A and B (vanilla LoRA otherwise: no DoRA or variants)."""

    modulation: LoraModulation
    block: int

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            hidden = lora_A(self.lora_dropout[adapter](x.to(lora_A.weight.dtype)))
            matrix = self.modulation.matrix(self.block, x.shape[0]).to(hidden.dtype)
            result = result + lora_B(self.modulate(hidden, matrix)) * self.scaling[adapter]
        return result.to(result_dtype)

    def merge(self, *args, **kwargs) -> None:
        raise UsageError("degradation-guided LoRA depends on each image's degradation and cannot be merged")


@lru_cache(maxsize=None)
def _lora_classes():
    """The two layer types, built on first use so that importing diffsr does not import peft."""
    from peft.tuners.lora import Conv2d, Linear

    class DegradationLoraLinear(_DegradationLoraMixin, Linear):
        @staticmethod
        def modulate(hidden: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
            # hidden (B, ..., r): each token's r features times C.
            return torch.einsum("b...k,bkr->b...r", hidden, matrix)

    class DegradationLoraConv2d(_DegradationLoraMixin, Conv2d):
        @staticmethod
        def modulate(hidden: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
            # hidden (B, r, H, W): each pixel's r channels times C.
            return torch.einsum("bkhw,bkr->brhw", hidden, matrix)

    return DegradationLoraLinear, DegradationLoraConv2d


def add_degradation_lora(model: torch.nn.Module, target_modules: list[str] | str, rank: int, adapter_name: str,
                         block_of: Callable[[str], int], lora_alpha: int = 8) -> LoraModulation:
    """Wrap `target_modules` (peft names or a regex) with degradation-guided LoRA layers.

    `block_of(module_name)` gives each layer's block index into the modulation matrices. Returns the
    modulation every layer reads its C from.
    """
    from peft import LoraConfig, inject_adapter_in_model

    linear_cls, conv_cls = _lora_classes()
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=target_modules)
    config._register_custom_module({torch.nn.Linear: linear_cls, torch.nn.Conv2d: conv_cls})
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    modulation = LoraModulation()
    for name, module in model.named_modules():
        if isinstance(module, _DegradationLoraMixin):
            module.modulation = modulation
            module.block = block_of(name)
    return modulation
