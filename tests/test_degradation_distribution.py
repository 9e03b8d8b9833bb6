"""Over 1,000 sampled parameter sets, the chosen kernel types, noise types, JPEG qualities and resize
factors follow the configured probabilities (chi-square goodness of fit)."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from diffsr.degradation import load_config, sample_params


pytestmark = pytest.mark.usefixtures("one_thread")


COUNT = 1000
P_MIN = 1e-3  # reject the fit below this p-value


@pytest.fixture(scope="module", params=["realesrgan_x4", "s3diff"])
def drawn(request):
    config = load_config(request.param)
    params = sample_params(config, torch.Generator().manual_seed(1234), COUNT)
    return config, [p for p in params if p["degrade"]]


def _fit(observed: Counter, expected: dict) -> float:
    """p-value of `observed` counts against `expected` probabilities (keys must cover all outcomes)."""
    assert set(observed) <= set(expected), f"unexpected outcomes {set(observed) - set(expected)}"
    keys = sorted(expected)
    total = sum(observed.values())
    probs = np.array([expected[k] for k in keys], dtype=float)
    return chisquare([observed.get(k, 0) for k in keys], probs / probs.sum() * total).pvalue


def _kernel_expectation(stage) -> dict:
    blur = stage.blur
    expected = {"none": 1 - stage.blur_prob, "sinc": stage.blur_prob * blur.sinc_prob}
    for kind, prob in zip(blur.types, blur.probs):
        expected[kind] = stage.blur_prob * (1 - blur.sinc_prob) * prob / sum(blur.probs)
    return {k: v for k, v in expected.items() if v > 0}


def _uniform_bins(values, low, high, bins=5):
    edges = np.linspace(low, high, bins + 1)
    counts = np.histogram(values, edges)[0]
    assert counts.sum() == len(values), "values outside the configured range"
    return Counter(dict(enumerate(counts))), {i: 1 / bins for i in range(bins)}


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_kernel_types(drawn, stage_name):
    config, params = drawn
    observed = Counter((p[stage_name]["blur"] or {"type": "none"})["type"] for p in params)
    assert _fit(observed, _kernel_expectation(getattr(config, stage_name))) > P_MIN


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_noise_types(drawn, stage_name):
    config, params = drawn
    stage = getattr(config, stage_name)
    observed = Counter((p[stage_name]["noise"]["type"], p[stage_name]["noise"]["gray"]) for p in params)
    g, gray = stage.gaussian_noise_prob, stage.gray_noise_prob
    expected = {("gaussian", True): g * gray, ("gaussian", False): g * (1 - gray),
                ("poisson", True): (1 - g) * gray, ("poisson", False): (1 - g) * (1 - gray)}
    assert _fit(observed, expected) > P_MIN
    sigmas = [p[stage_name]["noise"]["sigma"] for p in params if p[stage_name]["noise"]["type"] == "gaussian"]
    assert _fit(*_uniform_bins(sigmas, *stage.noise_sigma)) > P_MIN


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_jpeg_qualities(drawn, stage_name):
    config, params = drawn
    qualities = [p[stage_name]["jpeg"] for p in params]
    assert _fit(*_uniform_bins(qualities, *getattr(config, stage_name).jpeg_range)) > P_MIN


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_resize_factors(drawn, stage_name):
    config, params = drawn
    stage = getattr(config, stage_name)
    scales = np.array([p[stage_name]["resize"]["scale"] for p in params])
    direction = Counter(np.where(scales > 1, "up", np.where(scales < 1, "down", "keep")).tolist())
    assert _fit(direction, dict(zip(["up", "down", "keep"], stage.resize_probs))) > P_MIN
    low, high = stage.resize_range
    assert _fit(*_uniform_bins(scales[scales < 1], low, 1.0)) > P_MIN
    assert _fit(*_uniform_bins(scales[scales > 1], 1.0, high)) > P_MIN
    modes = Counter(p[stage_name]["resize"]["mode"] for p in params)
    assert _fit(modes, {m: 1 for m in stage.resize_modes}) > P_MIN


def test_final_step(drawn):
    config, params = drawn
    order = Counter(p["final"]["resize_first"] for p in params)
    assert _fit(order, {True: config.final.resize_first_prob, False: 1 - config.final.resize_first_prob}) > P_MIN
    sinc = Counter(p["final"]["sinc"]["type"] for p in params)
    assert _fit(sinc, {"sinc": config.final.sinc_prob, "pulse": 1 - config.final.sinc_prob}) > P_MIN
    sizes = Counter(p["stage1"]["blur"]["size"] for p in params)
    assert _fit(sizes, {s: 1 for s in config.stage1.blur.sizes}) > P_MIN


def test_the_check_rejects_wrong_probabilities(drawn):
    """The chi-square check has power: the same draws fail against swapped kernel probabilities."""
    config, params = drawn
    expected = _kernel_expectation(config.stage1)
    expected["iso"], expected["aniso"] = expected["aniso"], expected["iso"]
    observed = Counter((p["stage1"]["blur"] or {"type": "none"})["type"] for p in params)
    assert _fit(observed, expected) < P_MIN


def test_no_degradation_probability():
    config = load_config({"no_degradation_prob": 0.3})
    params = sample_params(config, torch.Generator().manual_seed(5), COUNT)
    observed = Counter(p["degrade"] for p in params)
    assert _fit(observed, {False: 0.3, True: 0.7}) > P_MIN
