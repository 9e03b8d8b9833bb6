"""Shared by the training tests: tiny configs, a few HR images, reading the loss log."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import smooth_image
from diffsr.training.config import config_from_dict


def hr_folder(folder: Path, count: int = 4, size: int = 64) -> Path:
    """`count` smooth test pictures of size x size px (HR crops come from these)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(smooth_image(size, size, seed=index)).save(folder / f"hr{index}.png")
    return folder


def pair_folders(folder: Path, count: int = 4, size: int = 64, scale: int = 4) -> tuple[Path, Path]:
    """LR/HR pairs (LR = box-downscaled HR) in two folders."""
    hr_dir, lr_dir = folder / "hr", folder / "lr"
    hr_folder(hr_dir, count, size)
    lr_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(hr_dir.glob("*.png")):
        Image.open(path).resize((size // scale, size // scale), Image.BOX).save(lr_dir / path.name)
    return lr_dir, hr_dir


def tiny_config(output_dir: Path, method: str, base, stage: int = 1, data: dict | None = None, **sections):
    """A TrainConfig for CPU tests: 64-px HR crops, batch 1, no TensorBoard, checkpoints every step."""
    values = {
        "method": method, "stage": stage, "base": str(base), "output_dir": str(output_dir),
        "data": data, "train": {"steps": 4, "batch_size": 1, "save_every": 1000, "log_every": 1,
                                "log_with": "none", "seed": 0},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(values.get(name), dict):
            values[name] = {**values[name], **value}
        else:
            values[name] = value
    return config_from_dict(values, "test config")


def logged(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


def falls(values: list[float], window: int = 5) -> tuple[float, float]:
    """Mean of the first and of the last `window` values."""
    return float(np.mean(values[:window])), float(np.mean(values[-window:]))
