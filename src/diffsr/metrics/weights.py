"""Where metric networks find their weight files: the same files, names and caches as the field's tools.

A file is looked up, in order, in the folder the user names (`weights_dir`, or $DIFFSR_METRIC_WEIGHTS),
in torch.hub's checkpoint cache (where torchvision and pytorch-fid keep theirs) and in pyiqa's cache
(<torch hub>/pyiqa). If it is in none of them and downloads are allowed, diffsr.weights fetches it into
torch.hub's checkpoint folder once; otherwise a WeightsError names the missing file and where to get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from diffsr.errors import WeightsError

_PYIQA_HUB = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"


@dataclass(frozen=True)
class WeightFile:
    name: str  # the release's file name, which is also its name in every cache
    url: str
    what: str  # for messages


WEIGHT_FILES = {
    "alexnet": WeightFile("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                          "torchvision AlexNet (ImageNet)"),
    "vgg16": WeightFile("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
                        "torchvision VGG16 (ImageNet)"),
    "lpips_alex": WeightFile("LPIPS_v0.1_alex-df73285e.pth", _PYIQA_HUB + "LPIPS_v0.1_alex-df73285e.pth",
                             "LPIPS v0.1 AlexNet linear layers"),
    "lpips_vgg": WeightFile("LPIPS_v0.1_vgg-a78928a0.pth", _PYIQA_HUB + "LPIPS_v0.1_vgg-a78928a0.pth",
                            "LPIPS v0.1 VGG linear layers"),
    "dists": WeightFile("DISTS_weights-f5e65c96.pth", _PYIQA_HUB + "DISTS_weights-f5e65c96.pth",
                        "DISTS alpha/beta weights"),
    "fid_inception": WeightFile("pt_inception-2015-12-05-6726825d.pth",
                                "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                                "pt_inception-2015-12-05-6726825d.pth",
                                "FID Inception-v3 (pytorch-fid port of the TensorFlow 2015-12-05 graph)"),
}


def search_folders(weights_dir: str | Path | None = None) -> list[Path]:
    import torch

    folders = []
    if weights_dir is not None:
        folders.append(Path(weights_dir))
    if os.environ.get("DIFFSR_METRIC_WEIGHTS"):
        folders.append(Path(os.environ["DIFFSR_METRIC_WEIGHTS"]))
    hub = Path(torch.hub.get_dir())
    folders += [hub / "checkpoints", hub / "pyiqa"]
    return folders


# How the metric commands (evaluate, benchmark) name another folder; training names it in its config instead.
CLI_FOLDER_HINT = " (or pass --metric-weights DIR)"


def weights_path(key: str, weights_dir: str | Path | None = None, download: bool = True) -> Path:
    """The local path of weight file `key` (see WEIGHT_FILES), downloading it into torch.hub's cache if allowed."""
    import torch

    file = WEIGHT_FILES[key]
    folders = search_folders(weights_dir)
    for folder in folders:
        if (folder / file.name).is_file():
            return folder / file.name
    target = Path(torch.hub.get_dir()) / "checkpoints" / file.name
    if download:
        from diffsr.weights import download_url  # the one module of diffsr that downloads

        try:
            return download_url(file.url, target, progress=False)
        except WeightsError as error:  # no network, proxy, HTTP error: say what to do instead
            reason = str(error)[:160]
    else:
        reason = "downloads are off"
    raise WeightsError(f"missing weights file {file.name} ({file.what}); {reason}. Get it from {file.url} "
                       f"and put it in {folders[0]}{CLI_FOLDER_HINT}")
