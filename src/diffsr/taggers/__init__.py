"""Image taggers whose tags prompt a method's UNet: the DAPE tagger OSEDiff ships (RAM Swin-L + DAPE's LoRA), or
plain RAM.

    from diffsr import taggers
    tag = taggers.load("dape")            # ram_swin_large_14m.pth + DAPE.pth from the weights cache
    tag(images)                           # (B, 3, H, W) in [0, 1] -> ["tag, tag, ...", ...]
    diffsr.load_upscaler("osediff", tagger=tag)

The files are looked for beside `beside` (an explicit method weights file) first, then in the registry cache
(`diffsr weights fetch ram-swin-large dape`); nothing is downloaded here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from diffsr.errors import UsageError, WeightsError
from diffsr.taggers.ram import RamTagger, apply_dape, build_model, tagging_state

NAMES = ("dape", "ram")
# registry item -> the release's file name
RAM_ITEM, RAM_FILE = "ram-swin-large", "ram_swin_large_14m.pth"
DAPE_ITEM, DAPE_FILE = "dape", "DAPE.pth"

__all__ = ["load", "NAMES", "RamTagger", "tag_list", "thresholds"]


def tag_list() -> list[str]:
    return resources.files(__package__).joinpath("data/ram_tag_list.txt").read_text(encoding="utf-8").splitlines()


def thresholds() -> torch.Tensor:
    """RAM's per-class thresholds. The release's rule (values over 0.9 kept, others min(value + 0, 0.9))
    leaves the file's values as they are."""
    text = resources.files(__package__).joinpath("data/ram_tag_list_threshold.txt").read_text(encoding="utf-8")
    return torch.tensor([float(line) for line in text.split()])


def find_file(item: str, file_name: str, given: str | Path | None, beside: str | Path | None) -> Path:
    """`given`, else `file_name` beside the file `beside`, else the cached registry item; missing: one line
    naming the file and the command that fetches it."""
    from diffsr import weights

    if given is not None:
        return Path(given)
    if beside is not None and (Path(beside).parent / file_name).is_file():
        return Path(beside).parent / file_name
    try:
        return weights.path(item)
    except WeightsError as error:
        where = f" not beside {beside} and" if beside is not None else ""
        raise WeightsError(f"the tagger needs {file_name}:{where} {error} (or use --tagger none)") from None


def load(name: str = "dape", device="cpu", dtype="auto", ram_weights: str | Path | None = None,
         dape_weights: str | Path | None = None, beside: str | Path | None = None) -> RamTagger:
    """Tagger `name` ("dape": RAM + DAPE's LoRA, OSEDiff's release default; "ram": RAM alone) on `device` in
    `dtype`, from the release's files (read with the restricted loader)."""
    from diffsr.backbone import resolve_device, resolve_dtype
    from diffsr.checkpoints import read_weights

    if name not in NAMES:
        raise UsageError(f"no tagger named {name!r} (choose {', '.join(NAMES)}, or none)")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ram_path = find_file(RAM_ITEM, RAM_FILE, ram_weights, beside)
    state = tagging_state(read_weights(ram_path), str(ram_path))
    if name == "dape":
        dape_path = find_file(DAPE_ITEM, DAPE_FILE, dape_weights, beside)
        apply_dape(state, read_weights(dape_path), str(dape_path))
    model = build_model(state, str(ram_path))
    tags = tag_list()
    if model.label_embed.shape[0] != len(tags):
        raise WeightsError(f"{ram_path}: {model.label_embed.shape[0]} label embeddings, but RAM's tag list has "
                           f"{len(tags)} tags")
    return RamTagger(model, tags, thresholds(), device, dtype)
