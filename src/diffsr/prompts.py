"""Prompts: the user's text, optionally joined with tags from a pluggable image tagger."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from diffsr.errors import UsageError


class Tagger(Protocol):
    """Anything that turns an image batch (B, 3, H, W) in [0, 1] into one tag string per image."""

    def __call__(self, images: torch.Tensor) -> list[str]: ...


def load_tagger(name_or_callable: str | Callable | None) -> Tagger | None:
    if name_or_callable is None or callable(name_or_callable):
        return name_or_callable
    raise UsageError(f"no tagger named '{name_or_callable}' is installed: diffsr does not bundle RAM/DAPE; "
                     "pass a callable tagger from Python (images -> list of tag strings) or use --prompt")


def compose_prompt(user_prompt: str, tags: str | None) -> str:
    """OSEDiff's release joins tagger output and user prompt as 'tags, prompt,'."""
    if tags is None:
        return user_prompt
    return f"{tags}, {user_prompt},"
