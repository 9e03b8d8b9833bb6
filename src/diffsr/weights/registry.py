"""The registry's data (registry.yaml) as typed records, and name look-up with suggestions."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from diffsr.errors import WeightsError

KINDS = ("base", "weights", "extra")


@dataclass(frozen=True)
class FileSpec:
    path: str  # inside the item (a folder item keeps the diffusers layout)
    size: int | None = None  # exact bytes, when known (checked)
    approx: str | None = None  # for display when the exact size is not known
    sha256: str | None = None
    git_sha1: str | None = None  # the git blob id, where that is all that is published

    @property
    def published_hash(self) -> bool:
        return bool(self.sha256 or self.git_sha1)


@dataclass(frozen=True)
class Source:
    hf: str | None = None  # Hugging Face repo id
    revision: str = "main"
    url: str | None = None  # "{file}" is replaced by the file's path
    gdrive: str | dict | None = None  # file id, folder id, or {folder inside the item: folder id}
    folder: bool = False

    def describe(self) -> str:
        if self.hf:
            return f"hf:{self.hf}@{self.revision[:12]}"
        if self.url:
            return self.url.replace("{file}", "*") if "{file}" in self.url else self.url
        ids = self.gdrive if isinstance(self.gdrive, str) else ",".join(self.gdrive.values())
        return f"gdrive:{ids}"


@dataclass(frozen=True)
class Item:
    name: str
    kind: str
    files: tuple[FileSpec, ...]
    sources: tuple[Source, ...]
    licence: str = "unknown"
    description: str = ""
    method: str | None = None
    variant: str | None = None
    default: bool = False
    base: str | None = None
    extras: dict = field(default_factory=dict)  # load option -> item name
    convert: str | None = None  # "safetensors": a pickled release, loaded from a one-time converted copy
    note: str = ""

    @property
    def single_file(self) -> bool:
        """One-file items resolve to that file; bases and the other items to their folder."""
        return self.kind != "base" and len(self.files) == 1 and "/" not in self.files[0].path

    @property
    def size_text(self) -> str:
        """Total size: exact when every file's size is known, else "~" and the sum of what is known."""
        known = [f.size or _parse_size(f.approx) for f in self.files]
        total = sum(k for k in known if k)
        if not total:
            return "?"
        return human_size(total) if all(f.size for f in self.files) else "~" + human_size(total)


def _parse_size(text: str | None) -> int | None:
    if not text:
        return None
    number, unit = text.split()
    return int(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class Registry:
    """The known items by name. `Registry.load()` reads $DIFFSR_REGISTRY if set, else the bundled file."""

    def __init__(self, items: dict[str, Item]):
        self.items = items

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Registry":
        import yaml

        path = path or os.environ.get("DIFFSR_REGISTRY")
        text = Path(path).read_text() if path else resources.files("diffsr.weights").joinpath("registry.yaml").read_text()
        where = str(path or "the bundled registry.yaml")
        data = yaml.safe_load(text) or {}
        return cls({name: _item(name, raw, where) for name, raw in (data.get("items") or {}).items()})

    def names(self) -> list[str]:
        return list(self.items)

    def get(self, name: str) -> Item:
        if name in self.items:
            return self.items[name]
        close = difflib.get_close_matches(name, self.items, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f" (known: {', '.join(self.items)})"
        raise WeightsError(f"unknown model '{name}' in the weights registry{hint}")

    def default_weights(self, method: str) -> Item:
        for item in self.items.values():
            if item.kind == "weights" and item.method == method and item.default:
                return item
        raise WeightsError(f"the weights registry has no default weights for method '{method}': pass --weights")

    def for_method(self, method: str) -> list[Item]:
        """The items `method` may use: its weights and extras, and the bases those name."""
        own = [item for item in self.items.values() if item.method == method]
        bases = {item.base for item in own if item.base}
        return [item for item in self.items.values() if item.name in bases] + own


def _item(name: str, raw: dict, where: str) -> Item:
    try:
        files = tuple(FileSpec(**f) for f in raw["files"])
        sources = tuple(Source(**s) for s in raw["sources"])
        fields = {k: v for k, v in raw.items() if k not in ("files", "sources")}
        item = Item(name=name, files=files, sources=sources, **fields)
    except (KeyError, TypeError) as error:
        raise WeightsError(f"{where}: item '{name}' is malformed ({error})") from None
    if item.kind not in KINDS:
        raise WeightsError(f"{where}: item '{name}' has kind '{item.kind}' (expected {', '.join(KINDS)})")
    return item
