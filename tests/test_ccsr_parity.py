"""Parity with the authors' CCSR code on tiny random weights (see tests/fixtures/ccsr/README.md)."""


import pytest
import torch

from diffsr.images import Picture
from diffsr.methods.ccsr import CCSR
from conftest import parity_fixture

TOLERANCE = 1e-3  # the bound; the measured differences are printed and far smaller


@pytest.fixture(scope="module")
def v2_reference(tiny_base, ccsr_v2_weights):
    return parity_fixture("ccsr/ccsr_v2_parity.pt", tiny_base, ccsr_v2_weights)


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
    # the cases hold the releases' outputs clamped to [0, 1]; v1's restore leaves the clamp to after the colour fix
    out = out.clamp(0, 1)
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
def v1_reference(tiny_base, ccsr_v1_weights):
    return parity_fixture("ccsr/ccsr_v1_parity.pt", tiny_base, ccsr_v1_weights)


@pytest.mark.parametrize("name", ["release_defaults", "paper_two_steps", "enlarge_cfg"])
@torch.no_grad()
def test_v1_matches_the_release_sampler(ccsr_v1, v1_reference, name):
    case = v1_reference[name]
    method = CCSR(ccsr_v1.backbone, ccsr_v1.controlnet, 1, ccsr_v1.condition_vae, process_size=case["process_size"])
    check_case(method, case, name, "inference_ccsr.py")


@pytest.mark.slow  # a 512x704 image through the sampler: about a minute
@torch.no_grad()
def test_v1_matches_the_release_script_at_its_settings(tiny_base, ccsr_v1, ccsr_v1_weights):
    """inference_ccsr.py at its defaults (tests/fixtures/ccsr/make_v1_release_run.py): a 40x56 input at x4 is
    sampled at 512x704 (a 64x88 latent) in one piece, as the script never tiles, and brought back to 224x160 with
    the script's truncation to 8 bits and Lanczos filter; 45 steps, t_max 0.6667, t_min 0.3333 (no colour fix: the
    next test has the script's default)."""
    check_release_run(tiny_base, ccsr_v1, ccsr_v1_weights, "ccsr_v1_release_run.pt", "none")


@pytest.mark.slow  # a 512x704 image through the sampler: about a minute
@torch.no_grad()
def test_v1_matches_the_release_script_with_its_default_color_fix(tiny_base, ccsr_v1, ccsr_v1_weights):
    """The same run with the script's default --color_fix_type adain, which it applies to the decoded image
    before clamping it (on the tiny weights the decoded values reach 1.8: clamping first differs by 14 levels);
    diffsr's default colour fix for v1, no colour fix argument."""
    check_release_run(tiny_base, ccsr_v1, ccsr_v1_weights, "ccsr_v1_release_run_adain.pt", None)


def check_release_run(tiny_base, ccsr_v1, ccsr_v1_weights, fixture: str, color_fix: str | None):
    """The release script's saved image (`fixture`, same weights, same preprocessing, the whole latent at every
    evaluation) within 1 level of 8 bits of `upscale` with `color_fix` (None: diffsr's default)."""
    reference = parity_fixture(f"ccsr/{fixture}", tiny_base, ccsr_v1_weights)
    method = CCSR(ccsr_v1.backbone, ccsr_v1.controlnet, 1, ccsr_v1.condition_vae,
                  process_size=reference["process_size"])
    assert reference["color_fix"] == (color_fix or method.default_color_fix)
    assert torch.allclose(method.backbone.encode_prompt([""]), reference["text_empty"], atol=1e-5)
    picture = Picture(reference["lr"].numpy())
    prepared = method.preprocess(picture, reference["upscale"])
    lq = (prepared.lr[0] * 255).round().to(torch.int64).permute(1, 2, 0)
    assert lq.shape == tuple(reference["lq_size"]) and lq.sum().item() == reference["lq_sum"]
    shapes = []
    unet = method.backbone.unet
    hook = unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        out = method.upscale(picture, scale=reference["upscale"], seed=reference["seed"], color_fix=color_fix).rgb
    finally:
        hook.remove()
    assert set(shapes) == {tuple(reference["latent_shape"][-2:])}  # the whole latent at every evaluation
    difference = (torch.from_numpy(out).int() - reference["out"].int()).abs()
    print(f"v1 release script, colour fix {reference['color_fix']}: max {difference.max().item()}, "
          f"mean {difference.float().mean().item():.4f} levels")
    assert out.shape == tuple(reference["out"].shape)
    assert difference.max().item() <= 1
