"""Prompts: the user's text, optionally joined with tags from a pluggable image tagger."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch

from diffsr.errors import ArgumentTypeError, UsageError


class Tagger(Protocol):
    """Anything that turns an image batch (B, 3, H, W) in [0, 1] into one tag string per image."""

    def __call__(self, images: torch.Tensor) -> list[str]: ...


def load_tagger(name_or_callable: str | Callable | None, device="cpu", dtype="auto",
                beside: str | Path | None = None, ram_weights=None, dape_weights=None) -> Tagger | None:
    """None or "none": no tagger; a callable: itself; "dape" / "ram": diffsr.taggers.load (the release's files
    beside the file `beside` or in the weights cache)."""
    if name_or_callable is None or callable(name_or_callable):
        return name_or_callable
    if not isinstance(name_or_callable, str):
        raise ArgumentTypeError(f"tagger must be a name or a callable, not {type(name_or_callable).__name__}")
    if name_or_callable == "none":
        return None
    from diffsr import taggers

    if name_or_callable not in taggers.NAMES:
        raise UsageError(f"no tagger named '{name_or_callable}' (choose {', '.join(taggers.NAMES)} or none, or pass "
                         "a callable from Python: images -> list of tag strings)")
    return taggers.load(name_or_callable, device=device, dtype=dtype, beside=beside, ram_weights=ram_weights,
                        dape_weights=dape_weights)


def compose_prompt(user_prompt: str, tags: str | None) -> str:
    """OSEDiff's release joins tagger output and user prompt as 'tags, prompt,'."""
    if tags is None:
        return user_prompt
    return f"{tags}, {user_prompt},"
