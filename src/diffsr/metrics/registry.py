"""The metric registry: every metric the papers report, by the name the papers use.

Full-reference metrics compare an SR image with its ground truth, no-reference metrics score the SR
image alone, and the distribution metric (FID) compares the SR set with the GT set. Each has a
built-in implementation (no torchvision needed) where one exists here, and pyiqa (`pip install
diffsr[iqa]`) as the other backend: `backend="auto"` takes the built-in one, else pyiqa.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffsr.errors import DiffsrError, UsageError
from diffsr.metrics import fidelity
from diffsr.metrics.spec import DISTRIBUTION, FULL_REFERENCE, NO_REFERENCE, MetricSpec, MetricUnavailable

BACKENDS = ("auto", "builtin", "pyiqa")


@dataclass
class SetFeatures:
    """A distribution metric in two steps (the built-in FID): per-image features, then one distance between the
    two sets' features, so that processes can each extract their share's features and gather them."""

    features: Callable  # list of paths -> (N, d) array
    distance: Callable  # (sr features, gt features) -> float

    def __call__(self, sr_paths: list[Path], gt_paths: list[Path]) -> float:
        return self.distance(self.features(sr_paths), self.features(gt_paths))


@dataclass
class Metric:
    """A ready metric. Full-reference: metric(sr, gt); no-reference: metric(sr) on (1, 3, H, W) tensors in
    [0, 1], returning a float. Distribution: metric.score(sr_paths, gt_paths)."""

    spec: MetricSpec
    backend: str
    compute: Callable

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def lower_better(self) -> bool:
        return self.spec.lower_better

    @torch.no_grad()
    def __call__(self, sr: torch.Tensor, gt: torch.Tensor | None = None) -> float:
        if self.kind == DISTRIBUTION:
            raise UsageError(f"{self.name} compares image sets: call .score(sr_paths, gt_paths)")
        if self.kind == FULL_REFERENCE and gt is None:
            raise UsageError(f"{self.name} needs the ground-truth image")
        value = self.compute(sr, gt) if self.kind == FULL_REFERENCE else self.compute(sr)
        return float(torch.as_tensor(value).reshape(-1)[0])

    @torch.no_grad()
    def score(self, sr_paths: list[Path], gt_paths: list[Path]) -> float:
        if self.kind != DISTRIBUTION:
            raise UsageError(f"{self.name} scores single images: call metric(sr, gt)")
        return float(self.compute(list(sr_paths), list(gt_paths)))


# -- built-in implementations --------------------------------------------------------------------------

def _fidelity(function):
    def build(device, weights_dir, download, y_channel=True, color_space="ycbcr", crop_border=0):
        return lambda sr, gt: function(sr, gt, y_channel=y_channel, color_space=color_space, crop_border=crop_border)
    return build


def _network(loader):
    def build(device, weights_dir, download, **options):
        model = loader(weights_dir, download, **options).to(device)
        return lambda *images: model(*(image.to(device) for image in images))
    return build


def _lpips(weights_dir, download, net="alex"):
    from diffsr.metrics.perceptual import LPIPS

    return LPIPS.from_files(net, weights_dir, download)


def _dists(weights_dir, download):
    from diffsr.metrics.perceptual import DISTS

    return DISTS.from_files(weights_dir, download)


def _niqe(device, weights_dir, download, crop_border=0):
    from diffsr.metrics.niqe import niqe

    return lambda sr: niqe(sr.to(device), crop_border=crop_border)


def _fid(device, weights_dir, download, batch_size=8):
    from diffsr.metrics.fid import FIDInception, frechet_distance, inception_features

    model = FIDInception.from_file(weights_dir, download).to(device)
    return SetFeatures(lambda paths: inception_features(model, paths, batch_size), frechet_distance)


_PAPER_Y = {"test_y_channel": True, "color_space": "ycbcr"}

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in (
    MetricSpec("psnr", FULL_REFERENCE, False, "PSNR (dB) on Y of YCbCr", "psnr", _PAPER_Y,
               _fidelity(fidelity.psnr)),
    MetricSpec("ssim", FULL_REFERENCE, False, "SSIM on Y of YCbCr", "ssim", _PAPER_Y,
               _fidelity(fidelity.ssim)),
    MetricSpec("lpips", FULL_REFERENCE, True, "LPIPS v0.1, AlexNet", "lpips", {}, _network(_lpips)),
    MetricSpec("lpips-vgg", FULL_REFERENCE, True, "LPIPS v0.1, VGG16", "lpips-vgg", {},
               _network(lambda w, d: _lpips(w, d, net="vgg"))),
    MetricSpec("dists", FULL_REFERENCE, True, "DISTS", "dists", {}, _network(_dists)),
    MetricSpec("niqe", NO_REFERENCE, True, "NIQE", "niqe", {}, _niqe),
    MetricSpec("musiq", NO_REFERENCE, False, "MUSIQ (KonIQ)", "musiq"),
    MetricSpec("maniqa", NO_REFERENCE, False, "MANIQA (PIPAL)", "maniqa-pipal"),
    MetricSpec("clipiqa", NO_REFERENCE, False, "CLIPIQA", "clipiqa"),
    MetricSpec("fid", DISTRIBUTION, True, "FID (Inception-v3, clean resize), SR set vs GT set", "fid", {}, _fid),
)}

DEFAULT_METRICS = ("psnr", "ssim", "lpips", "dists", "niqe", "fid")
PAPER_METRICS = ("psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa")


def list_metrics() -> list[str]:
    return list(SPECS)


def get_spec(name: str) -> MetricSpec:
    key = name.strip().lower()
    if key not in SPECS:
        raise UsageError(f"unknown metric '{name}' (available: {', '.join(SPECS)})")
    return SPECS[key]


def pyiqa_available() -> bool:
    try:
        import pyiqa  # noqa: F401
    except Exception:  # ImportError, or torchvision failing inside it
        return False
    return True


def create_metric(name: str, device: str | torch.device = "cpu", backend: str = "auto",
                  weights_dir: str | Path | None = None, download: bool = True, **options) -> Metric:
    """Build metric `name`. Options: psnr/ssim `y_channel`, `color_space` ("ycbcr" | "yiq"),
    `crop_border`; niqe `crop_border`; lpips `net` is chosen by name (lpips, lpips-vgg).
    Raises MetricUnavailable (with what to install or download) when it cannot run here."""
    spec = get_spec(name)
    if backend not in BACKENDS:
        raise UsageError(f"unknown metric backend '{backend}' (choose {', '.join(BACKENDS)})")
    device = torch.device(device)
    if backend == "builtin" or (backend == "auto" and spec.builtin is not None):
        if spec.builtin is None:
            raise MetricUnavailable(f"{spec.name} has no built-in implementation; it needs pyiqa: pip install diffsr[iqa]")
        try:
            return Metric(spec, "builtin", spec.builtin(device, weights_dir, download, **options))
        except DiffsrError as error:
            raise MetricUnavailable(str(error)) from None
        except TypeError as error:
            raise UsageError(f"{spec.name}: bad option ({error})") from None
    from diffsr.metrics.pyiqa_backend import build as build_pyiqa

    return Metric(spec, "pyiqa", build_pyiqa(spec, device, options))
