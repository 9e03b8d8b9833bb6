"""3x3 convolutions by NNPACK's Winograd transform on the CPU: the float32 fast path.

The VAE spends over 90% of its CPU time in 3x3 convolutions, and oneDNN's direct convolution already runs them
near the CPU's peak; Winograd's transform does the same convolution in about a third of the multiplications
(benchmarks/results/cpu_winograd.md: up to 3.3x faster per convolution, the VAE 2.6-2.8x, the UNet 1.2x). The
result differs from direct convolution by float32 rounding (about 1e-5 relative per convolution).

torch ships NNPACK but picks it by itself only for batches of 16 or more, so the eligible Conv2d modules are
switched to `WinogradConv2d` (a subclass: same parameters, state dict and peft wrapping). It takes the NNPACK
path only where NNPACK can and wins: CPU, float32, no gradient, maps of MIN_AREA pixels or more; anything else
(CUDA, half precision, training, small maps) runs `nn.Conv2d.forward` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def available() -> bool:
    """Whether this torch has NNPACK for this CPU (the call also initialises it, which the op needs)."""
    return bool(torch._nnpack_available())


# Size rules, measured (benchmarks/results/cpu_winograd.md): NNPACK transforms the kernel again on every call, so
# it wins on large maps (320 channels at 64x64: 3.3x faster; 640 at 32x32: 2x) and loses on small ones (1280 at
# 16x16: 1.1x slower, at 8x8: 2.6x); its batched algorithm is slower than direct convolution, one sample at a time
# is not (320 channels at 64x64, batch 2: 0.44 s batched, 0.16 s per sample, 0.43 s direct).
MIN_AREA = 32 * 32  # pixels of a map below which direct convolution runs


class WinogradConv2d(nn.Conv2d):
    """An nn.Conv2d (3x3, stride 1, no dilation or groups) that runs by NNPACK on CPU float32 inference, on maps
    of at least MIN_AREA pixels, one sample at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.dim() == 4 and x.shape[-2] * x.shape[-1] >= MIN_AREA and not torch.is_grad_enabled()):
            if x.shape[0] == 1:
                return torch._nnpack_spatial_convolution(x, self.weight, self.bias, self.padding)
            return torch.cat([torch._nnpack_spatial_convolution(sample, self.weight, self.bias, self.padding)
                              for sample in x.split(1)])
        return super().forward(x)


def runs_winograd(network: nn.Module) -> bool:
    """Whether `network` has convolutions switched to Winograd and sits on the CPU (where they take NNPACK)."""
    return any(type(module) is WinogradConv2d and module.weight.device.type == "cpu" for module in network.modules())


def eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1 and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple))


def use_winograd(networks: Iterable[nn.Module], enabled: bool = True) -> int:
    """Switch every eligible 3x3 convolution in `networks` to Winograd (or back, enabled=False); the number
    switched. Nothing changes where this torch has no NNPACK."""
    if enabled and not available():
        return 0
    switched = 0
    modules = {id(module): module for network in networks for module in network.modules()}  # shared ones once
    for module in modules.values():
        if enabled and eligible(module):
            module.__class__ = WinogradConv2d
        elif not enabled and type(module) is WinogradConv2d:
            module.__class__ = nn.Conv2d
        else:
            continue
        switched += 1
    return switched
