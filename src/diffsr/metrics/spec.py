"""What a metric is (kind, direction, names in pyiqa), shared by the registry and its backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from diffsr.errors import DiffsrError

FULL_REFERENCE, NO_REFERENCE, DISTRIBUTION = "full-reference", "no-reference", "distribution"


class MetricUnavailable(DiffsrError):
    """A metric cannot run on this machine (weights or an optional package missing)."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    lower_better: bool
    description: str
    pyiqa_name: str  # the name the papers passed to pyiqa.create_metric ...
    pyiqa_options: dict = field(default_factory=dict)  # ... and its options
    builtin: Callable | None = None  # (device, weights_dir, download, **options) -> callable on tensors
