import numpy as np
import pytest
import torch

from diffsr.errors import UsageError
from diffsr.metrics.stability import g_std, l_std, metric_g_std, pixel_std, upscale_runs


def test_g_std_is_the_mean_over_images_of_the_std_over_runs():
    values = [[30.0, 20.0], [32.0, 20.0], [34.0, 20.0]]  # 3 runs x 2 images
    assert g_std(values) == pytest.approx((np.std([30, 32, 34]) + 0.0) / 2)


def test_metric_g_std_with_and_without_references():
    runs = [[np.full((2, 2, 3), v, np.float32)] for v in (0.2, 0.4)]
    assert metric_g_std(lambda out, ref: (out - ref).mean(), runs, [np.zeros((2, 2, 3))]) == pytest.approx(0.1)
    assert metric_g_std(lambda out: out.mean(), runs) == pytest.approx(0.1)


def test_l_std_crops_the_border_and_averages_pixels():
    rng = np.random.RandomState(0)
    runs = [[rng.randint(0, 256, (12, 12, 3)).astype(np.uint8)] for _ in range(3)]
    stack = np.stack([r[0] for r in runs]).astype(np.float64)[:, 4:-4, 4:-4] / 255
    assert l_std(runs) == pytest.approx(stack.std(axis=0).mean())
    # The border does not count: changing it alone leaves L-STD unchanged.
    runs[0][0][:4] = 0
    assert l_std(runs) == pytest.approx(stack.std(axis=0).mean())
    # Identical runs are perfectly stable; tensors in [0, 1] are accepted.
    same = [[torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))] for _ in range(4)]
    assert l_std(same) == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda: g_std([[1.0, 2.0]]), "at least 2 runs"),
    (lambda: l_std([[np.zeros((9, 9, 3))]]), "at least 2 runs"),
    (lambda: l_std([[np.zeros((9, 9, 3))], []]), "same, non-zero number of images"),
    (lambda: pixel_std([np.zeros((8, 8, 3))] * 2), "too small"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(UsageError, match=message):
        call()


def test_runs_of_a_method_with_different_seeds(osediff):
    from conftest import smooth_image
    from diffsr.methods.osediff import OSEDiff

    small = OSEDiff(osediff.backbone, process_size=16)  # keeps the test fast
    runs = upscale_runs(small, [smooth_image(16, 16)], seeds=[0, 1, 2], scale=1, sample_posterior=True)
    assert len(runs) == 3 and runs[0][0].shape == (16, 16, 3)
    assert l_std(runs) > 0
