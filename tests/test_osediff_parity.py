"""Parity with the authors' OSEDiff code (github:cswry/OSEDiff, OSEDiff_test + test_osediff.py).

The fixture was made by running their code on CPU in float32 on the tiny model that
`diffsr.testing` writes with its default seed (see tests/fixtures/osediff/osediff_parity.json for the
versions). It holds their preprocessed input, model outputs (posterior mean, and posterior sampled after
torch.manual_seed(0)), colour-fixed results and the 8-bit image their script saves.
"""

import hashlib

import numpy as np
import pytest
import torch

from diffsr.color import adain, wavelet
from diffsr.images import Picture
from diffsr.methods.osediff import OSEDiff
from conftest import parity_fixture

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_base, osediff_weights):
    return parity_fixture("osediff/osediff_parity.pt", tiny_base, osediff_weights)


@torch.no_grad()
def run_case(osediff, case, seed_sampled):
    method = OSEDiff(osediff.backbone, process_size=case["process_size"])
    prepared = method.preprocess(Picture(case["lr"].numpy()), case["upscale"])
    lr = prepared.lr
    mean = method.restore(lr, torch.Generator().manual_seed(seed_sampled), prompt=case["prompt"])
    sampled = method.restore(lr, torch.Generator().manual_seed(seed_sampled), prompt=case["prompt"], sample_posterior=True)
    return lr, mean, sampled


@pytest.mark.parametrize("name", ["enlarge_x4", "odd_x4_prompt", "x2"])
def test_matches_the_release(osediff, reference, name):
    case = reference["cases"][name]
    lr, mean, sampled = run_case(osediff, case, case["seed"])
    assert torch.equal(lr[0], case["lq"]), "preprocessing differs from test_osediff.py"
    torch.testing.assert_close(osediff.backbone.encode_prompt([case["prompt"]])[0], case["prompt_embeds"], rtol=0, atol=1e-5)
    assert (mean[0] - (case["out_mean"] * 0.5 + 0.5)).abs().max() <= TOLERANCE
    assert (sampled[0] - (case["out_sample"] * 0.5 + 0.5)).abs().max() <= TOLERANCE
    assert (adain(mean, lr)[0] - case["adain_mean"]).abs().max() <= TOLERANCE
    assert (wavelet(mean, lr)[0] - case["wavelet_mean"]).abs().max() <= TOLERANCE
    # Their script quantises twice by truncation (ToPILImage before and after AdaIN); we round once.
    ours = (adain(sampled, lr)[0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(int)
    assert np.abs(ours - case["final_uint8_sample"].numpy().astype(int)).max() <= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full512_40x48_x4", "full512_36x44_x4", "full512_64x80_x2"])
@torch.no_grad()
def test_matches_the_release_at_process_size_512(osediff, reference, name):
    case = reference["full_cases"][name]
    prepared = osediff.preprocess(Picture(case["lr"].numpy()), case["upscale"])
    lq_u8 = (prepared.lr[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert list(prepared.lr.shape[1:]) == case["lq_shape"]
    assert hashlib.sha256(np.ascontiguousarray(lq_u8).tobytes()).hexdigest() == case["lq_uint8_sha256"]
    out = osediff.restore(prepared.lr, torch.Generator(), prompt=case["prompt"])[0] * 2 - 1
    height, width = out.shape[-2:]
    crops = {"tl": out[:, :16, :16], "center": out[:, height // 2 - 8:height // 2 + 8, width // 2 - 8:width // 2 + 8],
             "br": out[:, -16:, -16:]}
    for where, crop in crops.items():
        assert (crop - case[f"out_mean_crop_{where}"]).abs().max() <= TOLERANCE, where
