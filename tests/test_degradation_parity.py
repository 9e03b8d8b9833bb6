"""The deterministic parts of the degradation against BasicSR's code (fixtures made by
tests/fixtures/degradation/make_fixtures.py from BasicSR run on the same inputs and parameters)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsr.degradation import (add_noise, apply_degradation, filter2d, jpeg, load_config, make_kernels,
                                usm_sharpen)
from diffsr.degradation.kernels import kernel_sizes


pytestmark = pytest.mark.usefixtures("one_thread")


FIXTURES = Path(__file__).parent / "fixtures" / "degradation" / "reference.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURES) as data:
        return {key: data[key] for key in data.files}


def _t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


def test_every_kernel_type_matches(ref):
    specs = json.loads(str(ref["kernel_specs"]))
    assert {s["type"] for s in specs} >= {"iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                                         "plateau_aniso", "sinc", "pulse"}
    ours = make_kernels(specs, pad_to=21)
    expected = _t(ref["kernels"])
    for spec, mine, theirs in zip(specs, ours, expected):
        diff = (mine - theirs).abs().max().item()
        assert diff <= 1e-6, f"{spec}: max abs diff {diff:.3g}"


def test_kernel_sizes_are_recovered_from_padding(ref):
    specs = json.loads(str(ref["kernel_specs"]))
    sizes = kernel_sizes(make_kernels(specs, pad_to=21))
    for spec, size in zip(specs, sizes):
        # Tiny Gaussians underflow to exact zeros at their rim, which trims them further at no cost.
        assert size <= spec.get("size", 1) and size % 2 == 1


@pytest.mark.parametrize("case", ["filter_per_sample", "filter_shared"])
def test_filtering_matches(ref, case):
    images = _t(ref["filter_input"])
    kernels = _t(ref["kernels"])[[1, 3, 12]] if case == "filter_per_sample" else _t(ref["kernels"])[[6]]
    diff = (filter2d(images, kernels) - _t(ref[case])).abs().max().item()
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("index", range(4))
def test_noise_matches_with_the_same_draws(ref, index):
    kind, amount, gray, seed = json.loads(str(ref["noise_cases"]))[index]
    spec = {"type": kind, "gray": bool(gray), ("sigma" if kind == "gaussian" else "scale"): amount}
    ours = add_noise(_t(ref["noise_input"]), spec, torch.Generator().manual_seed(seed))
    expected = _t(ref[f"noise_{kind}_{gray}"])
    assert (ours - expected).abs().max().item() <= 1e-6
    assert (expected - _t(ref["noise_input"])).abs().mean() > 1e-3  # the fixture really is noisy


@pytest.mark.parametrize("quality", [30, 60, 95])
def test_jpeg_matches(ref, quality):
    ours = jpeg(_t(ref["jpeg_input"]), quality)
    diff = (ours - _t(ref[f"jpeg_{quality}"])).abs()
    assert diff.mean().item() <= 1 / 255, diff.mean().item() * 255
    assert diff.max().item() <= 0.1


def test_jpeg_per_sample_quality_in_one_batch(ref):
    images = torch.cat([_t(ref["jpeg_input"])] * 3)
    ours = jpeg(images, torch.tensor([30.0, 60.0, 95.0]))
    expected = _t(ref["jpeg_batch"])
    assert (ours - expected).abs().mean().item() <= 1 / 255
    # Each sample got its own quality: the low-quality one is further from the input.
    errors = [(ours[i] - images[i]).abs().mean().item() for i in range(3)]
    assert errors[0] > errors[1] > errors[2]


def test_usm_sharpening_matches(ref):
    ours = usm_sharpen(_t(ref["usm_input"]))
    diff = (ours - _t(ref["usm"])).abs().max().item()
    # The reference filters with the 51x51 outer product in float32, ours with two 51-tap passes.
    assert diff <= 2e-6, diff
    assert (ours - _t(ref["usm_input"])).abs().max() > 0.01


def test_whole_pipeline_matches_real_esrgan_with_the_same_choices(ref):
    """RealESRGANModel.feed_data with its random choices replayed from our parameters (noise sigma 0)."""
    cases = json.loads(str(ref["pipeline_cases"]))
    hr = _t(ref["pipeline_input"]).expand(len(cases), -1, -1, -1)
    config = load_config({"usm": {"input": True, "target": True}})
    lr, target = apply_degradation(hr, cases, config)
    expected = _t(ref["pipeline_lr"])
    diff = (lr - expected).abs()
    # Both are rounded to 8 bits at the end: float noise may flip a rounding, nothing more.
    assert diff.max().item() <= 1 / 255 + 1e-6, diff.max().item() * 255
    assert diff.mean().item() <= 0.05 / 255, diff.mean().item() * 255
    assert (target - _t(ref["pipeline_target"])).abs().max().item() <= 2e-6
    assert len({tuple(x.flatten()[:40].tolist()) for x in expected}) == len(cases)  # the cases differ
