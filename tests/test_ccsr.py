import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import diffsr
from diffsr.cli import main
from diffsr.errors import UsageError, WeightsError
from diffsr.methods.ccsr import v1_schedule, v2_schedule
from diffsr.testing import SD2_SCHEDULER_CONFIG
from conftest import smooth_image


def lr_tensor(size=64, seed=0):
    return torch.from_numpy(smooth_image(size, size, seed)).permute(2, 0, 1)[None].float() / 255


@torch.no_grad()
def restore(upscaler, seed=0, **knobs):
    return upscaler.restore(lr_tensor(), torch.Generator().manual_seed(seed), **knobs)


# -- the number of network evaluations ---------------------------------------------------------------

@pytest.mark.parametrize("steps, t_max, t_min, expected", [
    (6, 2 / 3, 1 / 2, 2),  # the paper's two-step setting
    (6, 0.6667, 0.5, 2),  # the release's multi-step script
    (1, 0.6666, 0.0, 1),  # one step (S1)
    (4, 0.75, 0.0, 4),  # first estimate + 3 steps down to t=1
    (10, 0.5, 0.2, 4),
    (6, 1.0, 0.5, 3),  # t_max = 1: no first estimate, steps from the noised LR latent
])
def test_v2_evaluation_count_is_the_papers(steps, t_max, t_min, expected):
    # paper: 1 (x0 at T) + round(T*t_max) - round(T*t_min) network evaluations
    assert v2_schedule(SD2_SCHEDULER_CONFIG, steps, t_max, t_min).evaluations == expected


def test_v2_chain_visits_the_release_timesteps():
    schedule = v2_schedule(SD2_SCHEDULER_CONFIG, 6, 0.6667, 0.5)
    assert schedule.start_t == 999 and [t for t, _, _ in schedule.steps] == [499]
    schedule = v2_schedule(SD2_SCHEDULER_CONFIG, 4, 0.75, 0.0)
    assert [t for t, _, _ in schedule.steps] == [501, 251, 1] and schedule.steps[-1][2] == 1.0


@pytest.mark.parametrize("steps, t_max, t_min, expected", [
    (45, 0.6667, 0.3333, 16),  # inference_ccsr.py defaults: indices 29 .. 15
    (6, 2 / 3, 1 / 2, 2),
    (6, 2 / 3, 0.0, 5),  # the release fails on t_min = 0; here the steps run down to index 0
])
def test_v1_evaluation_count(steps, t_max, t_min, expected):
    assert v1_schedule(SD2_SCHEDULER_CONFIG, steps, t_max, t_min).evaluations == expected


def test_v1_chain_uses_the_release_indices():
    schedule = v1_schedule(SD2_SCHEDULER_CONFIG, 45, 0.6667, 0.3333)
    spaced = [round(i * 999 / 44) for i in range(45)]
    spaced[22] = 499  # the release accumulates the stride; 22 * 999 / 44 is exactly 499.5
    assert schedule.start_t == 999
    assert [t for t, _, _ in schedule.steps] == [spaced[i] for i in range(29, 14, -1)]


@pytest.mark.parametrize("knobs, expected", [({}, 1), (dict(steps=6, t_max=0.6667, t_min=0.5, guidance_scale=4.5), 2),
                                             (dict(steps=10, t_max=0.5, t_min=0.2), 4)])
def test_restore_makes_that_many_evaluations(ccsr_v2, knobs, expected):
    before = ccsr_v2.evaluations  # a count on the shared fixture: compared, never reset
    restore(ccsr_v2, **knobs)
    assert ccsr_v2.evaluations - before == expected


@torch.no_grad()
def test_denoises_the_whole_latent_unless_the_budget_forces_tiles(ccsr_v2):
    """As the releases (which tile only on request): one pass over the whole 16x16 latent; tiles only under a
    memory budget too small for it, and then a warning says so."""
    import warnings

    from diffsr.tiling import TilingOptions

    shapes = []
    unet = ccsr_v2.backbone.unet
    hook = unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    lr, seed = lr_tensor(128), torch.Generator().manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ccsr_v2.restore(lr, seed, tiling=TilingOptions(tile_overlap=0))
        assert shapes == [(16, 16)]
        shapes.clear()
        with pytest.warns(UserWarning, match="a 16x16 latent does not fit the memory budget in one pass") as caught:
            ccsr_v2.restore(lr, torch.Generator().manual_seed(0), tiling=TilingOptions(tile_overlap=0, max_memory=1e-6))
        assert len(caught) == 1 and shapes == [(8, 8)] * 4
    finally:
        hook.remove()


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("knobs, message", [
    (dict(t_min=0.7, t_max=0.6), "t_min (0.7) must be smaller than t_max (0.6)"),
    (dict(t_min=0.5, t_max=0.5), "must be smaller than t_max"),
    (dict(t_max=1.2), "t_max must be at most 1 and at least 0, got 1.2"),
    (dict(t_min=-0.1), "t_min must be at least 0 and at most 1, got -0.1"),
    (dict(steps=0), "steps must be at least 1, got 0"),
    (dict(steps=2.5), "steps must be a whole number, got 2.5"),
    (dict(steps=2, t_max=0.6, t_min=0.4), "leaves no denoising step"),
    (dict(guidance_scale=0), "guidance_scale must be above 0, got 0"),
    (dict(guidance_scale=True), "guidance_scale must be a finite number, got True"),
    (dict(sample_posterior="yes"), "sample_posterior must be true or false"),
    (dict(strength=1), "ccsr has no option strength"),
])
def test_bad_knobs_are_one_clear_error(ccsr_v2, knobs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ccsr_v2(smooth_image(16, 16), scale=2, **knobs)


def test_weights_folder_errors(tiny_base, ccsr_v2_weights, tmp_path, monkeypatch):
    # Without weights the registry's default is used (issue 15): offline and not cached, one line names it.
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match="'ccsr-v1' is not in the cache .*`diffsr weights fetch ccsr-v1`"):
        diffsr.load_upscaler("ccsr", base=tiny_base, offline=True)
    with pytest.raises(WeightsError, match="not found"):
        diffsr.load_upscaler("ccsr", base=tiny_base, weights=tmp_path / "nothing")
    partial = tmp_path / "partial"
    shutil.copytree(ccsr_v2_weights / "controlnet", partial / "controlnet")
    with pytest.raises(WeightsError, match=r"missing vae/config.json"):
        diffsr.load_upscaler("ccsr", base=tiny_base, weights=partial)
    plain = tmp_path / "plain"
    shutil.copytree(ccsr_v2_weights, plain)
    config = json.loads((plain / "controlnet" / "config.json").read_text())
    del config["use_vae_encode_condition"]
    (plain / "controlnet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="image condition"):
        diffsr.load_upscaler("ccsr", base=tiny_base, weights=plain)


# -- behaviour -----------------------------------------------------------------------------------

def test_release_folder_loads_into_the_ccsr_modules(ccsr_v2, ccsr_v2_weights):
    from safetensors.torch import load_file

    saved = load_file(ccsr_v2_weights / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert "condition_conv_in.weight" in saved and not any(k.startswith("controlnet_cond_embedding") for k in saved)
    torch.testing.assert_close(ccsr_v2.controlnet.condition_conv_in.weight, saved["condition_conv_in.weight"])
    # The fine-tuned decoder replaces the base VAE's.
    vae = load_file(ccsr_v2_weights / "vae" / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(ccsr_v2.backbone.vae.decoder.conv_out.weight, vae["decoder.conv_out.weight"])


def test_condition_reaches_the_output(ccsr_v2):
    """Zeroing condition_conv_in must change the result: the LR latent enters through the ControlNet."""
    from diffsr.methods.ccsr import CCSR

    controlnet = copy.deepcopy(ccsr_v2.controlnet)  # the shared fixture stays as it is
    with torch.no_grad():
        controlnet.condition_conv_in.weight.zero_()
    zeroed = CCSR(ccsr_v2.backbone, controlnet, ccsr_v2.version, sample_posterior=ccsr_v2.sample_posterior,
                  process_size=ccsr_v2.process_size)
    assert (restore(zeroed) - restore(ccsr_v2)).abs().max() > 1e-4


def test_seed_fixes_every_draw(ccsr_v2):
    knobs = dict(steps=6, t_max=0.6667, t_min=0.5, guidance_scale=4.5)
    first = restore(ccsr_v2, seed=1, **knobs)
    torch.testing.assert_close(first, restore(ccsr_v2, seed=1, **knobs), rtol=0, atol=0)
    assert (first - restore(ccsr_v2, seed=2, **knobs)).abs().max() > 1e-4
    # Without posterior sampling the one-step result depends on the seed only through the start noise.
    assert (restore(ccsr_v2, seed=1, sample_posterior=False) - restore(ccsr_v2, seed=1)).abs().max() > 0


def test_prompts_and_guidance_change_the_result(ccsr_v2):
    base = restore(ccsr_v2, steps=6, t_max=0.6667, t_min=0.5)
    assert (base - restore(ccsr_v2, steps=6, t_max=0.6667, t_min=0.5, prompt="a cat")).abs().max() > 1e-4
    assert (base - restore(ccsr_v2, steps=6, t_max=0.6667, t_min=0.5, guidance_scale=3.0)).abs().max() > 1e-4


@pytest.mark.parametrize("scale, size, expected", [(4, (20, 14), (80, 56)), (2.5, (30, 20), (75, 50))])
def test_output_has_the_requested_size(ccsr_v2, scale, size, expected):
    from diffsr.methods.ccsr import CCSR

    small = CCSR(ccsr_v2.backbone, ccsr_v2.controlnet, 2, process_size=64)  # keeps the test fast
    width, height = size
    out = small(smooth_image(height, width), scale=scale)
    assert isinstance(out, Image.Image) and out.size == expected


def test_cli_passes_the_ccsr_knobs(tiny_base, ccsr_v2_weights, tmp_path, capsys):
    Image.fromarray(smooth_image(16, 20)).save(tmp_path / "in.png")
    common = ["upscale", str(tmp_path / "in.png"), "--method", "ccsr", "--base", str(tiny_base),
              "--weights", str(ccsr_v2_weights), "--scale", "2", "--quiet"]
    assert main(common + ["-o", str(tmp_path / "out"), "--steps", "6", "--t-max", "0.6667", "--t-min", "0.5",
                          "--guidance-scale", "1", "--negative-prompt", "blurry"]) == 0
    assert Image.open(tmp_path / "out" / "in.png").size == (40, 32)
    assert main(common + ["-o", str(tmp_path / "bad"), "--t-min", "0.9"]) == 2
    assert "--t-min (0.9) must be smaller than --t-max (0.6666)" in capsys.readouterr().err


# -- v1 checkpoints ------------------------------------------------------------------------------

def test_v1_names_round_trip_through_diffusers_converters(ccsr_v1):
    """Our diffusers -> LDM names (used to write checkpoints) are what diffusers' LDM converters read back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from diffsr.checkpoints.ldm import unet_to_ldm, vae_to_ldm

    unet, vae = ccsr_v1.backbone.unet, ccsr_v1.backbone.vae
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == unet.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
    levels = len(vae.config.block_out_channels)
    ldm = {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), {}, levels).items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in vae.state_dict().items())


def test_v1_checkpoint_loads_into_the_same_modules(ccsr_v1, ccsr_v1_weights):
    state = torch.load(ccsr_v1_weights)["state_dict"]
    first = state["control_model.input_blocks.0.0.weight"]
    assert first.shape[1] == 8  # x and the condition latent, concatenated
    conv_in, condition_conv_in = ccsr_v1.controlnet.conv_in, ccsr_v1.controlnet.condition_conv_in
    torch.testing.assert_close(torch.cat([conv_in.weight, condition_conv_in.weight], 1), first)
    assert ccsr_v1.version == 1 and ccsr_v1.condition_vae is not ccsr_v1.backbone.vae
    # The condition encoder is the checkpoint's cond_encoder, the decoder its first_stage_model's.
    torch.testing.assert_close(ccsr_v1.condition_vae.encoder.conv_in.weight, state["cond_encoder.encoder.conv_in.weight"])
    torch.testing.assert_close(ccsr_v1.backbone.vae.decoder.conv_out.weight, state["first_stage_model.decoder.conv_out.weight"])
    before = ccsr_v1.evaluations
    restore(ccsr_v1, steps=6, t_max=2 / 3, t_min=0.5)
    assert ccsr_v1.evaluations - before == 2


@torch.no_grad()
def test_v1_colour_fixes_the_decoded_image_before_clamping(ccsr_v1, ccsr_v2):
    """inference_ccsr.py (v1) applies its colour fix to the decoded image as it comes and clamps after; v2, as
    the other methods, clamps first. The slow release-script test in test_ccsr_parity.py checks the picture."""
    from diffsr.images import Picture, resize
    from diffsr.methods.base import color_fix_and_clamp
    from diffsr.methods.ccsr import CCSR

    assert ccsr_v2.clamp_before_color_fix and not ccsr_v1.clamp_before_color_fix
    v2 = restore(ccsr_v2)
    assert 0 <= v2.min() and v2.max() <= 1
    small = CCSR(ccsr_v1.backbone, ccsr_v1.controlnet, 1, ccsr_v1.condition_vae, process_size=64)  # fast
    picture, knobs = Picture(smooth_image(16, 16)), dict(steps=6, t_max=2 / 3, t_min=0.5)
    prepared = small.preprocess(picture, 4)
    decoded = small.restore(prepared.lr, torch.Generator().manual_seed(3), **knobs)
    assert decoded.min() < 0 or decoded.max() > 1  # the tiny decoder overshoots: what the fix sees matters

    def finished(clamp_first):
        fixed = color_fix_and_clamp(decoded.clone(), prepared.lr, "adain", clamp_first)
        return resize(small.quantize(fixed, np.uint8), prepared.out_size, small.output_resample)

    out = small.upscale(picture, scale=4, seed=3, **knobs).rgb
    assert np.array_equal(out, finished(clamp_first=False))
    assert np.abs(out.astype(int) - finished(clamp_first=True)).max() > 1


def test_v1_checkpoint_errors(tiny_base, ccsr_v1_weights, osediff_weights, tmp_path):
    with pytest.raises(WeightsError, match="osediff checkpoint, not ccsr"):
        diffsr.load_upscaler("ccsr", base=tiny_base, weights=shutil.copy(osediff_weights, tmp_path / "osediff.ckpt"))
    state = torch.load(ccsr_v1_weights)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("cond_encoder.")}
    torch.save(state, tmp_path / "no_cond.ckpt")
    with pytest.raises(WeightsError, match=r"no 'cond_encoder\.\*' tensors"):
        diffsr.load_upscaler("ccsr", base=tiny_base, weights=tmp_path / "no_cond.ckpt")


def test_full_size_controlnet_has_the_release_layout():
    """On SD 2.1's UNet config (built on the meta device: no memory), the CCSR ControlNet has the release's
    tensors: condition_conv_in (320, 4, 3, 3), 12 down zero convs and the mid one, no image-condition encoder."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from diffsr.nets.ccsr_controlnet import controlnet_class

    sd21 = dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                block_out_channels=[320, 640, 1280, 1280], layers_per_block=2)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd21)
        config = {k: v for k, v in ControlNetModel.from_unet(unet, load_weights_from_unet=False).config.items()
                  if not k.startswith("_")}
        controlnet = controlnet_class()(**config)
    shapes = {k: tuple(v.shape) for k, v in controlnet.state_dict().items()}
    assert shapes["condition_conv_in.weight"] == (320, 4, 3, 3)
    assert not any(k.startswith("controlnet_cond_embedding") for k in shapes)
    assert sum(k.startswith("controlnet_down_blocks.") and k.endswith(".weight") for k in shapes) == 12
    assert shapes["controlnet_mid_block.weight"] == (1280, 1280, 1, 1)
    assert controlnet.config.use_vae_encode_condition
