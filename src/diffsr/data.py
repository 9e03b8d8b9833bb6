"""Training datasets: HR images with random crops and on-the-fly degradation, and paired LR/HR folders.

- `HRImages`: folders (searched recursively) and/or file lists of HR images -> random `crop` x `crop`
  crops with random flips; with a degradation config each item also carries its LR, made on the CPU in
  the loader's worker. The faster way on a GPU is to leave `degradation` out and degrade whole batches
  on the device with `diffsr.degradation.degrade_batch` (plus `PairPool`, as Real-ESRGAN's trainer).
- `PairedImages`: LR and HR folders of a real-world set (RealSR, DRealSR), matched by name, with
  aligned random crops.

Images smaller than the crop are left out when the dataset is made (counted in `too_small`); files
that cannot be read are reported (`unreadable`, and a warning the first time) and replaced by another
item, so an epoch never stops on a bad file.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffsr.errors import ImageError, UsageError
from diffsr.images import IMAGE_SUFFIXES, image_size, read_image


def _image_files(sources) -> list[Path]:
    """Image files from folders (recursive, sorted) and file lists (.txt, one path per line, relative to the list)."""
    files: list[Path] = []
    for source in [sources] if isinstance(sources, (str, Path)) else sources:
        source = Path(source)
        if source.is_dir():
            files.extend(sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif source.suffix.lower() == ".txt" and source.is_file():
            for line in source.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    path = Path(line)
                    files.append(path if path.is_absolute() else source.parent / path)
        else:
            raise UsageError(f"{source}: neither a folder nor a .txt file list")
    return files


def _random_flip(images: list[torch.Tensor], flip: bool, rotate: bool) -> list[torch.Tensor]:
    """The same random horizontal flip (and 90-degree rotation) for every image of a pair."""
    if flip and torch.rand(()) < 0.5:
        images = [x.flip(-1) for x in images]
    if rotate:
        turns = int(torch.randint(4, ()))
        images = [torch.rot90(x, turns, dims=(-2, -1)) for x in images]
    return images


class _SafeImages(Dataset):
    """Shared: size check at start, and replacement of unreadable items during an epoch."""

    items: list
    unreadable: list[str]

    def _check(self, entries) -> list:
        """Keep the entries (entry, paths, sizes) whose every path is at least its size on both sides."""
        kept = []
        for entry, paths, needed in entries:
            try:
                if all(min(image_size(p)) >= n for p, n in zip(paths, needed)):
                    kept.append(entry)
                else:
                    self.too_small += 1
            except ImageError as error:
                self.unreadable.append(str(error))
        if self.too_small or self.unreadable:
            warnings.warn(f"{type(self).__name__}: left out {self.too_small} item(s) smaller than the crop and "
                          f"{len(self.unreadable)} unreadable file(s) (listed in .unreadable)", stacklevel=3)
        return kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.items)):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                return self._load(item)
            except ImageError as error:
                if str(error) not in self.unreadable:
                    self.unreadable.append(str(error))
                    warnings.warn(f"skipping {error}", stacklevel=2)
        raise ImageError("no readable image left in the dataset")

    def _load(self, item) -> dict:
        raise NotImplementedError


class HRImages(_SafeImages):
    """HR crops (3, crop, crop) in [0, 1] with random flips; `degradation` (a config or its name) adds "lr"."""

    def __init__(self, sources, crop: int = 512, flip: bool = True, rotate: bool = False, degradation=None):
        from diffsr.degradation import load_config

        self.crop, self.flip, self.rotate = crop, flip, rotate
        self.degradation = None if degradation is None else load_config(degradation)
        self.too_small, self.unreadable = 0, []
        files = _image_files(sources)
        self.items = self._check([(path, [path], [crop]) for path in files])
        if not self.items:
            raise UsageError(f"no readable HR image of at least {crop}x{crop} px in {sources} "
                             f"({self.too_small} too small, {len(self.unreadable)} unreadable)")

    def _load(self, path: Path) -> dict:
        image = read_image(path).to_tensor()[0]
        height, width = image.shape[-2:]
        if min(height, width) < self.crop:  # the file changed since the size check
            raise ImageError(f"{path}: smaller than the crop {self.crop} px")
        top = int(torch.randint(height - self.crop + 1, ()))
        left = int(torch.randint(width - self.crop + 1, ()))
        (hr,) = _random_flip([image[:, top:top + self.crop, left:left + self.crop]], self.flip, self.rotate)
        item = {"hr": hr.contiguous(), "path": str(path)}
        if self.degradation is not None:
            from diffsr.degradation import degrade_batch

            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
            with torch.no_grad():
                lr, target, _ = degrade_batch(item["hr"][None], self.degradation, generator)
            item["lr"], item["hr"] = lr[0], target[0]
        return item


# Name endings that tell LR from HR files of one scene: _LR4 / _HR (RealSR), _x4 / _x1 (DRealSR), _lr / _hr.
_PAIR_SUFFIX = re.compile(r"([_-](lr|hr|lq|gt)\d*|[_-]x\d+)$", re.IGNORECASE)


def pair_key(path: Path) -> str:
    """The scene name that an LR file and its HR file share."""
    return _PAIR_SUFFIX.sub("", path.stem)


class PairedImages(_SafeImages):
    """Aligned LR/HR pairs from two folders (or one folder with `lr_pattern`/`hr_pattern`), matched by name.

    Items: {"lr": (3, crop/scale, crop/scale), "hr": (3, crop, crop)} with the same random crop and flip;
    `crop=None` keeps whole images (then use batch size 1 or same-size images).
    """

    def __init__(self, lr_dir, hr_dir, scale: int = 4, crop: int | None = None, flip: bool = True,
                 rotate: bool = False, lr_pattern: str = "*", hr_pattern: str = "*"):
        if crop is not None and crop % scale:
            raise UsageError(f"crop {crop} is not a multiple of the scale {scale}")
        self.scale, self.crop, self.flip, self.rotate = scale, crop, flip, rotate
        self.too_small, self.unreadable = 0, []

        def listing(folder, pattern):
            folder = Path(folder)
            if not folder.is_dir():
                raise UsageError(f"{folder}: no such folder")
            return {pair_key(p): p for p in sorted(folder.glob(pattern)) if p.suffix.lower() in IMAGE_SUFFIXES}

        lrs, hrs = listing(lr_dir, lr_pattern), listing(hr_dir, hr_pattern)
        self.unmatched = sorted(str(p) for key, p in {**lrs, **hrs}.items() if key not in lrs or key not in hrs)
        keys = sorted(set(lrs) & set(hrs))
        needed = [crop // scale, crop] if crop else [1, 1]
        self.items = self._check([((lrs[k], hrs[k]), [lrs[k], hrs[k]], needed) for k in keys])
        if not self.items:
            raise UsageError(f"no usable LR/HR pairs in {lr_dir} and {hr_dir} ({len(self.unmatched)} unmatched files, "
                             f"{self.too_small} too small, {len(self.unreadable)} unreadable)")

    def _load(self, item) -> dict:
        lr_path, hr_path = item
        lr, hr = read_image(lr_path).to_tensor()[0], read_image(hr_path).to_tensor()[0]
        if hr.shape[-2] != lr.shape[-2] * self.scale or hr.shape[-1] != lr.shape[-1] * self.scale:
            raise ImageError(f"{hr_path}: {tuple(hr.shape[-2:])} is not {self.scale}x its LR {lr_path} "
                             f"{tuple(lr.shape[-2:])}")
        if self.crop:
            size = self.crop // self.scale
            top = int(torch.randint(lr.shape[-2] - size + 1, ()))
            left = int(torch.randint(lr.shape[-1] - size + 1, ()))
            lr = lr[:, top:top + size, left:left + size]
            s = self.scale
            hr = hr[:, top * s:(top + size) * s, left * s:(left + size) * s]
        lr, hr = _random_flip([lr, hr], self.flip, self.rotate)
        return {"lr": lr.contiguous(), "hr": hr.contiguous(), "path": str(hr_path)}


class PairPool:
    """Real-ESRGAN's training-pair pool: batches go in, random batches of the pooled pairs come out.

    Until `size` pairs are pooled, batches pass through; then each new batch replaces a random
    `batch` of the pool and that batch is returned, which mixes degradations across batches.
    """

    def __init__(self, size: int = 180, generator: torch.Generator | None = None):
        self.size, self.generator = size, generator
        self.lr: torch.Tensor | None = None
        self.hr: torch.Tensor | None = None

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lr is None or self.lr.shape[0] < self.size:
            self.lr = lr.clone() if self.lr is None else torch.cat([self.lr, lr])[: self.size]
            self.hr = hr.clone() if self.hr is None else torch.cat([self.hr, hr])[: self.size]
            return lr, hr
        chosen = torch.randperm(self.size, generator=self.generator)[: lr.shape[0]].to(lr.device)
        out_lr, out_hr = self.lr[chosen].clone(), self.hr[chosen].clone()
        self.lr[chosen], self.hr[chosen] = lr, hr
        return out_lr, out_hr
