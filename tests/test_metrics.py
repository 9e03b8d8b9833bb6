"""Built-in metrics against pyiqa's numbers on the same images and the same (synthetic) weights.

The fixtures were made by tests/fixtures/metrics/make_pyiqa_fixtures.py with pyiqa 0.1.16.
"""

import json

import numpy as np
import pytest
import torch

from metric_helpers import FIXTURES, metric_weights, no_weight_cache  # noqa: F401  (fixtures)
import synthetic  # noqa: E402  (on the path once metric_helpers is imported)
from diffsr.metrics import MetricUnavailable, create_metric, pyiqa_available
from diffsr.metrics.fid import FIDInception, frechet_distance, inception_features

REFERENCE = json.loads((FIXTURES / "metrics" / "pyiqa_reference.json").read_text())
PAIRS = synthetic.image_pairs()

# fixture key -> (diffsr metric name, options); the papers call pyiqa with test_y_channel and ycbcr
CASES = {
    "psnr": ("psnr", {}),
    "psnr_crop4": ("psnr", {"crop_border": 4}),
    "psnr_rgb": ("psnr", {"y_channel": False}),
    "ssim": ("ssim", {}),
    "ssim_crop4": ("ssim", {"crop_border": 4}),
    "lpips": ("lpips", {}),
    "lpips_vgg": ("lpips-vgg", {}),
    "dists": ("dists", {}),
    "niqe": ("niqe", {}),
}


def as_tensor(image):
    return torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


VGG_BASED = ("lpips_vgg", "dists")  # a few seconds per image on a CPU: one image by default, all when slow


@pytest.mark.parametrize("key", [k for k in CASES if k not in VGG_BASED] + [
    pytest.param(k, marks=pytest.mark.slow, id=f"{k}-all-images") for k in VGG_BASED])
def test_metric_matches_pyiqa(key, metric_weights):
    check_against_pyiqa(key, metric_weights, PAIRS)


@pytest.mark.parametrize("key", VGG_BASED)
def test_vgg_metric_matches_pyiqa_on_one_image(key, metric_weights):
    check_against_pyiqa(key, metric_weights, PAIRS[1:2])


def check_against_pyiqa(key, metric_weights, pairs):
    name, options = CASES[key]
    metric = create_metric(name, weights_dir=metric_weights, download=False, **options)
    assert metric.backend == "builtin"
    worst = 0.0
    for image, sr, gt in pairs:
        value = metric(as_tensor(sr)) if metric.kind == "no-reference" else metric(as_tensor(sr), as_tensor(gt))
        worst = max(worst, abs(value - REFERENCE["images"][image][key]))
    print(f"{key}: max |diffsr - pyiqa| = {worst:.2e}")
    assert worst < 1e-4


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    return synthetic.write_image_folders(tmp_path_factory.mktemp("fid"))


def test_fid_inception_features_match_pyiqa(metric_weights, image_folders):
    sr_paths = sorted(image_folders[0].iterdir())  # a.png, b.png, c.png: one image keeps this fast
    model = FIDInception.from_file(metric_weights, download=False)
    features = inception_features(model, sr_paths[1:2])
    expected = np.load(FIXTURES / "metrics" / "pyiqa_fid_features.npz")["sr"][1:2]
    difference = np.abs(features - expected).max()
    print(f"FID features: max |diffsr - pyiqa| = {difference:.2e} (values up to {np.abs(expected).max():.2f})")
    assert difference < 1e-4


@pytest.mark.slow
def test_fid_matches_pyiqa(metric_weights, image_folders):
    sr_dir, gt_dir = image_folders
    metric = create_metric("fid", weights_dir=metric_weights, download=False)
    value = metric.score(sorted(sr_dir.iterdir()), sorted(gt_dir.iterdir()))
    print(f"FID: diffsr {value:.8f} pyiqa {REFERENCE['fid_2048']:.8f}")
    assert abs(value - REFERENCE["fid_2048"]) < 1e-4


def test_frechet_distance_equals_the_sqrtm_formula():
    from scipy import linalg

    rng = np.random.RandomState(0)
    for count in (40, 300):  # fewer and more samples than dimensions: both code paths
        a, b = rng.randn(count, 64), 1.3 * rng.randn(count, 64) + 0.2
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                    - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_metric_without_weights_names_the_missing_file(no_weight_cache, tmp_path):
    with pytest.raises(MetricUnavailable) as error:
        create_metric("lpips", weights_dir=tmp_path, download=False)
    message = str(error.value)
    assert "LPIPS_v0.1_alex-df73285e.pth" in message and "https://" in message and str(tmp_path) in message
    with pytest.raises(MetricUnavailable, match="pt_inception-2015-12-05-6726825d.pth"):
        create_metric("fid", weights_dir=tmp_path, download=False)
    # metrics without weights still work
    image = as_tensor(PAIRS[0][1])
    assert create_metric("psnr")(image, image) == pytest.approx(80.0)  # 10 log10(1 / 1e-8)


def test_weights_found_in_torch_hub_cache(monkeypatch, tmp_path, metric_weights):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for file in metric_weights.iterdir():
        (cache / file.name).symlink_to(file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("DIFFSR_METRIC_WEIGHTS", raising=False)
    sr, gt = as_tensor(PAIRS[0][1]), as_tensor(PAIRS[0][2])
    value = create_metric("lpips", download=False)(sr, gt)
    assert abs(value - REFERENCE["images"]["a.png"]["lpips"]) < 1e-6


def test_wrong_weights_file_is_a_clear_error(no_weight_cache, tmp_path, metric_weights):
    for file in metric_weights.iterdir():
        (tmp_path / file.name).symlink_to(file)
    (tmp_path / "vgg16-397923af.pth").unlink()
    (tmp_path / "vgg16-397923af.pth").symlink_to(metric_weights / "alexnet-owt-7be5be79.pth")
    with pytest.raises(MetricUnavailable, match="vgg16-397923af.pth.*(missing|shape)"):
        create_metric("dists", weights_dir=tmp_path, download=False)
    (tmp_path / "DISTS_weights-f5e65c96.pth").unlink()
    (tmp_path / "DISTS_weights-f5e65c96.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MetricUnavailable,
                       match="DISTS_weights-f5e65c96.pth: not a readable weights file, corrupt or truncated"):
        create_metric("dists", weights_dir=tmp_path, download=False)


@pytest.mark.skipif(pyiqa_available(), reason="pyiqa is installed here, so MUSIQ/MANIQA/CLIPIQA run through it")
@pytest.mark.parametrize("name", ["musiq", "maniqa", "clipiqa"])
def test_pyiqa_only_metrics_say_what_to_install(name):
    with pytest.raises(MetricUnavailable, match=r"needs pyiqa: pip install diffsr\[iqa\]"):
        create_metric(name)


def test_unknown_metric_and_option():
    from diffsr.errors import UsageError

    with pytest.raises(UsageError, match="unknown metric 'psnrr'"):
        create_metric("psnrr")
    with pytest.raises(UsageError, match="psnr: bad option"):
        create_metric("psnr", window=7)


def test_full_reference_metric_needs_gt():
    from diffsr.errors import UsageError

    with pytest.raises(UsageError, match="needs the ground-truth"):
        create_metric("ssim")(as_tensor(PAIRS[0][1]))


def test_identical_images_score_perfectly(metric_weights):
    image = as_tensor(PAIRS[1][2][:64, :64])
    assert create_metric("ssim")(image, image) == pytest.approx(1.0)
    assert create_metric("lpips", weights_dir=metric_weights, download=False)(image, image) == pytest.approx(0, abs=1e-7)
    assert create_metric("dists", weights_dir=metric_weights, download=False)(image, image) == pytest.approx(0, abs=1e-5)
