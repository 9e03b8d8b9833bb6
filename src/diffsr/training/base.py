"""What a method's trainer supplies to the shared loop (diffsr.training.loop).

The loop owns data, optimisers, mixed precision, gradient accumulation, checkpoints, logging and validation.
A trainer owns only its method: which modules train, its losses, and how to write the result in the
authors' release format. Each iteration runs the trainer's `phases` in order; a phase is one optimiser step:
for every micro-batch the loop calls `trainer(batch, phase)` -> (loss, logs), back-propagates loss divided by
the number of micro-batches, then clips and steps that phase's optimiser. A phase may leave tensors in `batch`
for a later phase of the same iteration (e.g. the generator's output for the discriminator).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from diffsr.errors import UsageError


class Trainer(nn.Module):
    method: str = ""
    stage: int = 1
    # (phase, optimiser) in the order they run each iteration; several phases may share one optimiser.
    phases: tuple[tuple[str, str], ...] = (("generator", "generator"),)
    # The iteration being trained (0-based); the loop sets it before each one (e.g. for a GAN's start step).
    global_step: int = 0

    @classmethod
    def from_config(cls, config) -> "Trainer":
        """Build from a TrainConfig: `cls(base=..., weights=..., **config.method_args)`."""
        return cls(base=config.base, weights=config.weights, **cls.method_args(config))

    @classmethod
    def method_args(cls, config) -> dict:
        """`config.method_args`, each key checked against the trainer's own arguments (those besides the model:
        base and weights, or a built `model`)."""
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "base", "weights", "model"}
        unknown = sorted(set(config.method_args) - accepted)
        if unknown:
            raise UsageError(f"{cls.method} stage {cls.stage} has no method_args key {unknown[0]!r} "
                             f"(known: {', '.join(sorted(accepted))})")
        return config.method_args

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optimiser name -> the parameters it trains (every one requires grad; the groups are disjoint)."""
        raise NotImplementedError

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules that must come out of training unchanged (tests hash them)."""
        raise NotImplementedError

    def forward(self, batch: dict, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of `phase` on one micro-batch, and numbers to log. `batch` holds "lr" (B,3,h,w) and
        "hr" (B,3,H,W) in [0, 1] on the training device."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass of the big trained networks (less memory, more time)."""
        raise NotImplementedError

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Mixed precision: store every parameter that takes no gradient in `dtype` (no float32 master copy is
        needed for it); trained parameters stay float32 for the optimiser. Autocast mixes the two.
        Those of `released_frozen()` keep a float32 copy on the CPU for save_release."""
        keep = {id(p) for module in self.released_frozen() for p in module.parameters()}
        self._float32 = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                if id(param) in keep and param.dtype == torch.float32:
                    self._float32[name] = param.data.to("cpu", copy=True)
                param.data = param.data.to(dtype)

    def released_frozen(self) -> list[nn.Module]:
        """Modules whose frozen parameters the release files hold as well (e.g. a whole UNet around trained
        layers): mixed precision must not round them in what save_release writes."""
        return []

    @contextmanager
    def float32_frozen(self):
        """Within: the frozen parameters of `released_frozen()` at their float32 values (for save_release)."""
        saved = getattr(self, "_float32", {})
        params = dict(self.named_parameters())
        current = {name: params[name].data for name in saved}
        for name, value in saved.items():
            params[name].data = value.to(current[name].device)
        try:
            yield
        finally:
            for name, value in current.items():
                params[name].data = value

    def upscaler(self):
        """The method's Upscaler on the modules being trained (shares their tensors), for validation images."""
        raise NotImplementedError

    def save_release(self, folder: Path) -> list[Path]:
        """Write the trained weights in the authors' release format (what `diffsr upscale --weights` and the
        authors' code load); returns the files written."""
        raise NotImplementedError


def global_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from torch's global RNG, for code that takes a generator (samplers): the loop's
    per-step seeding of the global RNG still decides every draw."""
    seed = int(torch.randint(0, 2**62, ()))
    return torch.Generator(device=device).manual_seed(seed)


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def tensors_digest(named) -> str:
    """sha256 over (name, tensor) pairs: names, dtypes, shapes and values."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def state_digest(module: nn.Module) -> str:
    """Did training change this module? sha256 over its state dict."""
    return tensors_digest(module.state_dict().items())


def frozen_digest(trainer: nn.Module) -> str:
    """sha256 over every parameter that takes no gradient: the base networks and the frozen parts of partly
    trained ones. Training must leave it unchanged."""
    return tensors_digest([(n, p) for n, p in trainer.named_parameters() if not p.requires_grad])
