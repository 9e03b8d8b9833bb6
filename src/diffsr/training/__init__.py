"""Training and fine-tuning: one loop on accelerate (loop.py), one small trainer per method and stage."""

from __future__ import annotations

from importlib import import_module

from diffsr.errors import UsageError

# (method, stage) -> "module:class", imported on use so that diffsr does not import every trainer.
TRAINERS = {
    ("osediff", 1): "diffsr.training.osediff:OSEDiffTrainer",
    ("s3diff", 1): "diffsr.training.s3diff:S3DiffTrainer",
    ("stablesr", 1): "diffsr.training.stablesr:StableSRStage1",  # time-aware encoder + SFT, SD frozen
    ("stablesr", 2): "diffsr.training.stablesr:StableSRStage2",  # CFW on stage-1 latents
    ("ccsr", 1): "diffsr.training.ccsr:CCSRStage1",  # ControlNet with the truncated-diffusion losses
    ("ccsr", 2): "diffsr.training.ccsr_decoder:CCSRStage2",  # VAE decoder fine-tuning
}


def trainer_class(method: str, stage: int = 1):
    if (method, stage) not in TRAINERS:
        known = ", ".join(f"{m} stage {s}" for m, s in TRAINERS)
        raise UsageError(f"no trainer for {method} stage {stage} (available: {known})")
    module, name = TRAINERS[method, stage].split(":")
    return getattr(import_module(module), name)
