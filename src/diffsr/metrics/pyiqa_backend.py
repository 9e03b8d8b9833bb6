"""pyiqa as a metric backend: the toolbox the papers used, for the metrics not built in here
(MUSIQ, MANIQA, CLIPIQA) and, on request, for all of them (`backend="pyiqa"`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from diffsr.metrics.spec import DISTRIBUTION, FULL_REFERENCE, MetricSpec, MetricUnavailable


def _import_pyiqa():
    try:
        import pyiqa
    except Exception as error:  # ImportError, or torchvision failing to load inside it
        raise MetricUnavailable(f"needs pyiqa: pip install diffsr[iqa] (import failed: {type(error).__name__}: "
                                f"{str(error).strip()[:80]})") from None
    return pyiqa


def build(spec: MetricSpec, device: torch.device, options: dict):
    pyiqa = _import_pyiqa()
    renamed = {"y_channel": "test_y_channel"}
    options = {renamed.get(k, k): v for k, v in options.items()}
    try:
        metric = pyiqa.create_metric(spec.pyiqa_name, device=device, **{**spec.pyiqa_options, **options})
    except Exception as error:  # weights download failures and the like, in pyiqa's words
        raise MetricUnavailable(f"pyiqa could not build {spec.pyiqa_name} ({type(error).__name__}: "
                                f"{str(error).strip()[:120]})") from None
    if spec.kind == DISTRIBUTION:
        def compute(sr_paths, gt_paths):
            # pyiqa's FID reads whole folders: link the two sets into their own folders.
            with tempfile.TemporaryDirectory() as folder:
                dirs = []
                for label, paths in (("sr", sr_paths), ("gt", gt_paths)):
                    target = Path(folder) / label
                    target.mkdir()
                    for i, path in enumerate(paths):
                        os.symlink(Path(path).resolve(), target / f"{i:06d}{Path(path).suffix.lower()}")
                    dirs.append(str(target))
                return float(metric(dirs[0], dirs[1], verbose=False))
        return compute
    if spec.kind == FULL_REFERENCE:
        return lambda sr, gt: metric(sr.to(device), gt.to(device))
    return lambda sr: metric(sr.to(device))
