"""Fixtures shared by the metric, evaluation and report tests (imported by name into each test module)."""

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES / "metrics"))  # synthetic.py: shared with the pyiqa fixture script


_written: list = []  # this module is imported once, so the files are written once per session


@pytest.fixture(scope="session")
def metric_weights(tmp_path_factory):
    """Synthetic weights in the standard files (same values pyiqa was given for the fixtures)."""
    import synthetic

    if not _written:
        folder = tmp_path_factory.mktemp("metric-weights")
        synthetic.write_diffsr_weight_files(folder)
        _written.append(folder)
    return _written[0]


@pytest.fixture
def no_weight_cache(tmp_path, monkeypatch):
    """An empty torch.hub cache, so only explicitly given weights are found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("DIFFSR_METRIC_WEIGHTS", raising=False)
