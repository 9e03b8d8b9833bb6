"""Fixtures shared by the metric, evaluation and report tests (imported by name into each test module)."""

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES / "metrics"))  # synthetic.py: shared with the pyiqa fixture script


@pytest.fixture(scope="session")
def metric_weights(tmp_path_factory):
    """Synthetic weights in the standard files (same values pyiqa was given for the fixtures)."""
    import synthetic

    folder = tmp_path_factory.mktemp("metric-weights")
    synthetic.write_diffsr_weight_files(folder)
    return folder


@pytest.fixture
def no_weight_cache(tmp_path, monkeypatch):
    """An empty torch.hub cache, so only explicitly given weights are found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("DIFFSR_METRIC_WEIGHTS", raising=False)
