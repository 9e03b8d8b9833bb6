"""The method registry: one class per method, each built from a base model and the authors' weights."""

from __future__ import annotations

from diffsr.errors import UsageError
from diffsr.methods.base import Upscaler
from diffsr.methods.ccsr import CCSR
from diffsr.methods.osediff import OSEDiff
from diffsr.methods.s3diff import S3Diff
from diffsr.methods.stablesr import StableSR

METHODS: dict[str, type[Upscaler]] = {cls.name: cls for cls in (CCSR, OSEDiff, S3Diff, StableSR)}


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[Upscaler]:
    key = name.lower()
    if key not in METHODS:
        raise UsageError(f"unknown method '{name}' (available: {', '.join(list_methods())})")
    return METHODS[key]
