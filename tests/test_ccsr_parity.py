"""Parity with the authors' CCSR code on tiny random weights (see tests/fixtures/ccsr/README.md)."""

from pathlib import Path

import pytest
import torch

from diffsr.images import Picture
from diffsr.methods.ccsr import CCSR

FIXTURES = Path(__file__).parent / "fixtures" / "ccsr"
TOLERANCE = 1e-3  # the bound; the measured differences are printed and far smaller


@pytest.fixture(scope="module")
def v2_reference():
    return torch.load(FIXTURES / "ccsr_v2_parity.pt")


def check_case(method, case, name, script):
    """Preprocessing identical to the release `script`, output within TOLERANCE, and the same number of
    ControlNet calls (v1 runs CFG as two calls)."""
    prepared = method.preprocess(Picture(case["lr"].numpy()), case["upscale"])
    assert torch.equal((prepared.lr[0] * 255).round().to(torch.uint8).permute(1, 2, 0), case["lq"]), \
        f"preprocessing differs from {script}"
    method.evaluations = 0
    out = method.restore(prepared.lr, torch.Generator().manual_seed(case["seed"]), prompt=case["prompt"],
                         negative_prompt=case["negative_prompt"], steps=case["steps"], t_max=case["t_max"],
                         t_min=case["t_min"], guidance_scale=case["guidance"])
    difference = (out[0] - case["out"]).abs().max().item()
    print(f"{name}: max abs difference {difference:.2e}")
    assert difference <= TOLERANCE
    assert method.evaluations == case["evaluations"]


@pytest.mark.parametrize("name", ["onestep", "multistep_cfg", "chain_to_zero", "enlarge_cfg"])
@torch.no_grad()
def test_v2_matches_the_release_pipeline(ccsr_v2, v2_reference, name):
    case = v2_reference[name]
    method = CCSR(ccsr_v2.backbone, ccsr_v2.controlnet, 2, process_size=case["process_size"])
    check_case(method, case, name, "test_ccsr_tile.py")


@pytest.fixture(scope="module")
def v1_reference():
    return torch.load(FIXTURES / "ccsr_v1_parity.pt")


@pytest.mark.parametrize("name", ["release_defaults", "paper_two_steps", "enlarge_cfg"])
@torch.no_grad()
def test_v1_matches_the_release_sampler(ccsr_v1, v1_reference, name):
    case = v1_reference[name]
    method = CCSR(ccsr_v1.backbone, ccsr_v1.controlnet, 1, ccsr_v1.condition_vae, process_size=case["process_size"])
    check_case(method, case, name, "inference_ccsr.py")
