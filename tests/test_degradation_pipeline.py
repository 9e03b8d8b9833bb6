"""The whole pipeline on small images: shapes, ranges, per-sample parameters, reproducibility, configs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffsr.degradation import DegradationConfig, apply_degradation, degrade_batch, load_config, sample_params
from diffsr.errors import UsageError


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(count=4, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    return F.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)


def test_batch_shapes_range_and_quantisation():
    hr = _images(6)
    lr, target, params = degrade_batch(hr, load_config(), torch.Generator().manual_seed(0))
    assert lr.shape == (6, 3, 16, 16) and target is hr and len(params) == 6
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, torch.round(lr * 255) / 255)
    assert (lr - F.interpolate(hr, size=(16, 16), mode="area")).abs().mean() > 1e-3  # it did degrade


def test_parameters_are_drawn_per_sample():
    params = sample_params(load_config(), torch.Generator().manual_seed(3), 16)
    assert len({p["stage1"]["resize"]["scale"] for p in params}) > 10
    assert len({p["noise_seed"] for p in params}) == 16
    assert len({p["final"]["resize_first"] for p in params}) == 2


def test_same_seed_same_pairs_other_seed_other_pairs():
    hr = _images()
    first = degrade_batch(hr, load_config(), torch.Generator().manual_seed(7))
    again = degrade_batch(hr, load_config(), torch.Generator().manual_seed(7))
    other = degrade_batch(hr, load_config(), torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and first[2] == again[2]
    assert not torch.equal(first[0], other[0])


def test_pairs_are_remade_from_their_json_parameters():
    hr = _images()
    config = load_config()
    lr, _, params = degrade_batch(hr, config, torch.Generator().manual_seed(11))
    recorded = json.loads(json.dumps({"config": config.to_dict(), "params": params}))
    remade, _ = apply_degradation(hr, recorded["params"], load_config(recorded["config"]))
    assert torch.equal(lr, remade)


def test_a_sample_does_not_depend_on_its_batch():
    hr = _images(4)
    config = load_config()
    lr, _, params = degrade_batch(hr, config, torch.Generator().manual_seed(2))
    alone, _ = apply_degradation(hr[2:3], params[2:3], config)
    assert (alone[0] - lr[2]).abs().max() <= 1 / 255 + 1e-6
    assert (alone[0] - lr[2]).abs().mean() <= 1e-3


def test_every_branch_runs():
    """Force each option once: up/down resizes, every mode, gray and colour noise of both kinds, both orders."""
    config = load_config()
    hr = _images(1)
    base = sample_params(config, torch.Generator().manual_seed(0), 1)[0]
    variants = []
    for mode in ("area", "bilinear", "bicubic"):
        for scale, order, noise in ((0.3, True, {"type": "gaussian", "sigma": 20.0, "gray": True}),
                                    (1.4, False, {"type": "poisson", "scale": 2.0, "gray": False}),
                                    (1.0, True, {"type": "poisson", "scale": 1.0, "gray": True})):
            p = json.loads(json.dumps(base))
            p["stage1"]["resize"] = {"scale": scale, "mode": mode}
            p["stage1"]["noise"] = p["stage2"]["noise"] = noise
            p["stage2"]["blur"] = None
            p["stage2"]["resize"] = {"scale": 0.7, "mode": mode}  # so that the final resize has work to do
            p["final"].update(resize_first=order, mode=mode, sinc={"type": "pulse"})
            variants.append(p)
    lr, _ = apply_degradation(hr.expand(len(variants), -1, -1, -1), variants, config)
    assert lr.shape == (len(variants), 3, 16, 16) and torch.isfinite(lr).all()
    assert len({tuple(x.flatten()[:50].tolist()) for x in lr}) == len(variants)


def test_no_degradation_is_a_bicubic_downscale():
    hr = _images(2)
    lr, _, params = degrade_batch(hr, load_config({"no_degradation_prob": 1.0}), torch.Generator().manual_seed(0))
    assert all(not p["degrade"] for p in params)
    expected = F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(lr, expected)


def test_usm_options():
    hr = _images(2, size=96)
    config = load_config({"usm": {"input": True, "target": True}})
    _, target, _ = degrade_batch(hr, config, torch.Generator().manual_seed(0))
    assert (target - hr).abs().max() > 0.01


@pytest.mark.parametrize("name, lr_side, quantised", [("realesrgan_x4", 24, True), ("s3diff", 24, False),
                                                      ("osediff_face", 96, False)])
def test_bundled_configs(name, lr_side, quantised):
    config = load_config(name)
    lr, _, params = degrade_batch(_images(3, size=96), config, torch.Generator().manual_seed(4))
    assert lr.shape == (3, 3, lr_side, lr_side)
    assert torch.equal(lr, torch.round(lr * 255) / 255) == quantised
    if name == "osediff_face":
        assert params[0]["stage2"] is None and params[0]["stage1"]["blur"]["size"] == 41
        assert 1 <= params[0]["stage1"]["resize"]["divisor"] <= 30


def test_bundled_x4_config_is_the_default_and_values_are_fields():
    assert load_config("realesrgan_x4") == DegradationConfig()
    s3diff = load_config("s3diff")
    assert s3diff.stage1.noise_sigma == [1.0, 15.0] and s3diff.stage2.jpeg_range == [60.0, 100.0]
    assert s3diff.stage2.blur.sigma == [0.2, 1.0] and s3diff.stage2.blur_prob == 0.5
    assert math.isclose(load_config().stage1.blur.sinc_cutoff[0], math.pi / 5)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="unknown key stage1.noise_sigmaa"):
        load_config({"stage1": {"noise_sigmaa": [1, 2]}})
    with pytest.raises(UsageError, match="odd"):
        load_config({"stage1": {"blur": {"sizes": [8]}}})
    with pytest.raises(UsageError, match="no such degradation config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(UsageError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("scale: 2\nstage2: {noise_sigma: [1, 5]}\n")
    config = load_config(good)
    assert config.scale == 2 and config.stage2.noise_sigma == [1, 5] and config.stage2.blur_prob == 0.8
