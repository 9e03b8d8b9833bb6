"""StableSR: parity with the authors' model code (github:IceClear/StableSR) on tiny random weights,
the LDM <-> diffusers key conversion, the samplers, and bad input.

The fixture was made by tests/fixtures/stablesr/make_reference.py, which runs their UNetModelDualcondV2,
EncoderUNetModelWT, AutoencoderKLResi and LatentDiffusionSRTextWT.sample on the checkpoint pair that
`diffsr.testing.make_tiny_weights("stablesr", ...)` writes with its default seed.
"""


import pytest
import torch

import diffsr
from diffsr.checkpoints import ldm
from diffsr.errors import UsageError, WeightsError
from diffsr.methods.stablesr import CFW_NAME, StableSR
from diffsr.samplers import Schedule, guide, sample_ddim, sample_ddpm, space_timesteps, to_eps
from conftest import parity_fixture

@pytest.fixture(scope="module")
def files(tiny_base, stablesr_weights):
    """conftest's tiny base (the one the fixtures were made on, as parity_fixture checks) and StableSR weights."""
    return tiny_base, stablesr_weights


@pytest.fixture(scope="module")
def stablesr(files):
    base, weights = files
    return diffsr.load_upscaler("stablesr", base=base, weights=weights)


def release_files(files):
    base, weights = files
    return base, weights, weights.parent / CFW_NAME


@pytest.fixture(scope="module")
def reference(files):
    return parity_fixture("stablesr/stablesr_parity.pt", *release_files(files))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_release_format_pair(files):
    base, weights = files
    main = torch.load(weights)["state_dict"]
    cfw = torch.load(weights.parent / CFW_NAME)["state_dict"]
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.spade.mlp_gamma") for k in main)
    assert any(k.startswith("structcond_stage_model.fea_tran.3.") for k in main)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in main)
    assert any(k.startswith("decoder.fusion_layer_2.encode_enc_2.1.rdb3.conv5") for k in cfw)
    assert diffsr.checkpoints.detect(main) == "stablesr" and diffsr.checkpoints.detect(cfw) == "stablesr"


def test_unet_and_encoder_call_matches_release(stablesr, reference):
    with torch.no_grad():
        maps = stablesr.encoder(reference["call_lr_latent"], reference["call_t"])
        eps = stablesr.unet(reference["call_x"], reference["call_t"], reference["call_text"], maps)
    for width, feature in maps.items():
        assert max_diff(feature, reference[f"call_map_{width}"]) <= 1e-4
    assert max_diff(eps, reference["call_eps"]) <= 1e-4


def test_cfw_decoder_matches_release(stablesr, reference):
    with torch.no_grad():
        dist, features = stablesr.autoencoder.encode(reference["cfw_image"])
        assert max_diff(dist.mean, reference["cfw_mean"]) <= 1e-4
        for w in (0.5, 1.0):
            decoded = stablesr.autoencoder.decode(reference["cfw_z"], features, w)
            assert max_diff(decoded, reference[f"cfw_decoded_{w}"]) <= 1e-4
        plain = stablesr.autoencoder.vae.decode(reference["cfw_z"]).sample
        assert torch.equal(stablesr.autoencoder.decode(reference["cfw_z"], features, 0.0), plain)
        assert max_diff(stablesr.autoencoder.decode(reference["cfw_z"], features, 0.5), plain) > 1e-3


def test_four_step_run_matches_release(stablesr, reference):
    """Turbo schedule (t = 999, 666, 333, 0) from the LR latent noised to t=999, CFW w = 0.5."""
    generator = torch.Generator().manual_seed(int(reference["run_seed"]))
    with torch.no_grad():
        dist, features = stablesr.autoencoder.encode(reference["run_image"])
        condition = dist.sample(generator) * stablesr.scaling_factor
        assert max_diff(condition, reference["run_init_latent"]) <= 1e-4
        latent = stablesr.sample(condition, reference["run_text"], generator, steps=4)
        decoded = stablesr.autoencoder.decode(latent / stablesr.scaling_factor, features, 0.5)
    assert max_diff(latent, reference["run_samples"]) <= 1e-3
    assert max_diff(decoded, reference["run_decoded"]) <= 1e-3


def test_key_conversion_round_trips(stablesr):
    unet = stablesr.backbone.unet
    state = unet.state_dict()
    back = ldm.unet_from_ldm({ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(state, 1).items()}, unet.config)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    config = stablesr.encoder.config
    enc = stablesr.encoder.state_dict()
    back = ldm.encoder_from_ldm(ldm.encoder_to_ldm(enc, config), config)
    assert back.keys() == enc.keys() and all(torch.equal(back[k], enc[k]) for k in enc)


def test_space_timesteps():
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(1000, 200)[:3] == [0, 5, 10] and space_timesteps(1000, 200)[-1] == 999
    with pytest.raises(UsageError):
        space_timesteps(1000, 0)


def test_v_prediction_gives_the_same_samples_as_eps():
    """A v-model built from an eps-model must sample identically (DDPM and DDIM)."""
    abar = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).pow(2)
    abar = torch.cumprod(1 - abar, 0)
    eps_model = lambda x, t: torch.tanh(x) * (t.float()[:, None, None, None] / 1000 + 0.5)  # noqa: E731

    def v_model(x, t):
        a = abar[t].float()[:, None, None, None]
        eps = eps_model(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    schedule = Schedule.respaced(abar, 10)
    for run in (lambda m, p: sample_ddpm(m, x, schedule, torch.Generator().manual_seed(1), p),
                lambda m, p: sample_ddim(m, x, schedule, 0.5, torch.Generator().manual_seed(1), p)):
        assert torch.allclose(run(eps_model, "epsilon"), run(v_model, "v_prediction"), atol=1e-4)
    with pytest.raises(UsageError):
        to_eps(x, x, 0.5, "x0")


def test_guidance_combines_negative_and_positive():
    model = lambda x, text: x * text.mean(dim=(1, 2))[:, None, None, None]  # noqa: E731
    x = torch.ones(1, 4, 2, 2)
    positive, negative = torch.full((1, 77, 8), 2.0), torch.full((1, 77, 8), 0.5)
    assert torch.allclose(guide(model, x, positive, negative, 7.0), x * (0.5 + 7 * 1.5))
    assert torch.allclose(guide(model, x, positive, None, 7.0), x * 2)


def small(stablesr):
    """The same networks with the release's --input_size lowered, so whole runs stay fast."""
    return StableSR(stablesr.backbone, stablesr.unet, stablesr.encoder, stablesr.autoencoder, process_size=64)


def test_upscale_odd_size_all_samplers(stablesr):
    method = small(stablesr)
    lr = torch.rand(1, 3, 13, 17, generator=torch.Generator().manual_seed(0))
    # processed at 64 x 83 (padded to 64 x 96), brought back to 4x the input
    image = method(lr, scale=4, seed=0, sampler="ddim", steps=2, guidance_scale=3.0, fidelity=1.0, start="noise")
    assert image.size == (68, 52)
    first = method.upscale(lr, scale=4, seed=3, steps=2).rgb
    assert first.shape == (52, 68, 3)
    assert (first == method.upscale(lr, scale=4, seed=3, steps=2).rgb).all()
    assert (first != method.upscale(lr, scale=4, seed=4, steps=2).rgb).any()


def test_preprocess_as_released(stablesr):
    from diffsr.images import Picture
    import numpy as np

    picture = Picture(np.zeros((30, 50, 3), np.uint8))
    prepared = stablesr.preprocess(picture, 4)
    # shorter side to the base's native size (256 for the tiny base), by one factor for both sides
    assert prepared.lr.shape[-2:] == (256, int(50 * 256 / 30)) and prepared.out_size == (200, 120)


def test_bad_input(stablesr, files, tmp_path):
    lr = torch.rand(1, 3, 16, 16)
    for fidelity in (-0.1, 1.5):
        with pytest.raises(UsageError, match="fidelity"):
            small(stablesr)(lr, scale=4, fidelity=fidelity, steps=1)
    with pytest.raises(UsageError, match="sampler"):
        small(stablesr)(lr, scale=4, sampler="euler", steps=1)
    base, weights = files
    v_file = tmp_path / "stablesr_768v_000139.ckpt"
    v_file.symlink_to(weights)
    with pytest.raises(WeightsError, match="v-prediction"):
        StableSR.load(base, v_file)
    plain = tmp_path / "plain_vae.ckpt"
    state = torch.load(weights.parent / CFW_NAME)["state_dict"]
    torch.save({"state_dict": {k: v for k, v in state.items() if "fusion_layer" not in k}}, plain)
    with pytest.raises(WeightsError, match="fusion"):
        StableSR.load(base, weights, cfw_weights=plain)
    no_sft = tmp_path / "sd.ckpt"
    main = torch.load(weights)["state_dict"]
    torch.save({"state_dict": {k: v for k, v in main.items() if ".spade." not in k}}, no_sft)
    with pytest.raises(WeightsError, match="no SFT"):
        StableSR.load(base, no_sft)
    lonely = tmp_path / "alone" / "stablesr_000117.ckpt"
    lonely.parent.mkdir()
    lonely.symlink_to(weights)
    with pytest.warns(UserWarning, match="plain VAE decoder"):
        StableSR.load(base, lonely)


def test_convert_cli_then_load_gives_the_same_model(stablesr, files, reference, tmp_path):
    from diffsr.cli import main

    base, weights = files
    out = tmp_path / "converted"
    assert main(["convert", str(weights), str(weights.parent / CFW_NAME), "-o", str(out), "--base", str(base)]) == 0
    assert (out / "vqgan_cfw_00011.safetensors").is_file()  # found beside the converted model file
    converted = StableSR.load(base, out / "stablesr_000117.safetensors")
    with torch.no_grad():
        maps = converted.encoder(reference["call_lr_latent"], reference["call_t"])
        eps = converted.unet(reference["call_x"], reference["call_t"], reference["call_text"], maps)
        dist, features = converted.autoencoder.encode(reference["cfw_image"])
        decoded = converted.autoencoder.decode(reference["cfw_z"], features, 0.5)
    assert max_diff(eps, reference["call_eps"]) <= 1e-4
    assert max_diff(decoded, reference["cfw_decoded_0.5"]) <= 1e-4
    assert main(["convert", str(tmp_path / "missing.ckpt"), "-o", str(out), "--base", str(base)]) == 2


@pytest.mark.slow
def test_cli_knobs(files, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from diffsr.cli import main

    base, weights = files
    Image.fromarray(np.full((12, 10, 3), 120, np.uint8)).save(tmp_path / "a.png")
    common = ["upscale", str(tmp_path / "a.png"), "--method", "stablesr", "--base", str(base),
              "--weights", str(weights), "--steps", "1", "--quiet"]
    assert main(common + ["-o", str(tmp_path / "bad"), "--fidelity", "1.5"]) == 2  # a usage error, before any image
    assert "--fidelity must be at most 1 and at least 0, got 1.5" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("*.png"))
    assert main(common + ["-o", str(tmp_path / "out"), "--fidelity", "1", "--sampler", "ddim",
                          "--guidance-scale", "2", "--negative-prompt", "blurry", "--scale", "2"]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (20, 24)


def test_tiler_hook_sees_latent_and_condition_tiles(stablesr, reference):
    """A tiler that cuts the latent (and the LR-latent condition) into two halves and pastes the
    predictions back must give the model per-tile calls; with guidance it still merges linearly."""
    seen = []

    def halves(denoise, latent, condition):
        seen.append((latent.shape, condition.shape))
        width = latent.shape[-1] // 2
        return torch.cat([denoise(latent[..., :width], condition[..., :width]),
                          denoise(latent[..., width:], condition[..., width:])], dim=-1)

    condition = reference["run_init_latent"]
    text = reference["run_text"]
    with torch.no_grad():
        tiled = stablesr.sample(condition, text, torch.Generator().manual_seed(0), steps=2, tiler=halves,
                                negative=torch.zeros_like(text), guidance_scale=2.0)
        whole = stablesr.sample(condition, text, torch.Generator().manual_seed(0), steps=2,
                                negative=torch.zeros_like(text), guidance_scale=2.0)
    assert len(seen) == 2 and seen[0] == (condition.shape, condition.shape)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert max_diff(tiled, whole) > 1e-3  # halves really ran separately (no context across the cut)


@pytest.mark.slow
def test_bfloat16_runs_close_to_float32(files):
    """The restored image before quantizing (where NaN would become 0 and pass): finite and close to float32."""
    base, weights = files
    lr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = {}
    for dtype in ("float32", "bfloat16"):
        method = StableSR.load(base, weights, dtype=dtype, process_size=64)
        with torch.no_grad():
            results[dtype] = method.restore(lr, torch.Generator().manual_seed(0), steps=2, sampler="ddim",
                                            guidance_scale=2.0).float()
    low = results["bfloat16"]
    assert low.shape == (1, 3, 64, 64) and torch.isfinite(low).all()
    assert (low - results["float32"]).abs().mean() < 0.05


@pytest.fixture(scope="module")
def release_runs(files):
    return parity_fixture("stablesr/stablesr_release_runs.pt", *release_files(files))


def test_release_padding():
    from diffsr.methods.stablesr import release_padding

    assert release_padding(128, 184) == (32, 8)  # 160 x 192, as the scripts pad
    assert release_padding(128, 192) == (0, 0) and release_padding(100, 70) == (28, 26)


@pytest.mark.parametrize("name", ["ddpm_canvas_tile", "ddim_canvas_tile", "ddpm_old"])
def test_whole_run_matches_the_release_script(stablesr, release_runs, name):
    """The authors' scripts at their settings (tests/fixtures/stablesr/make_release_runs.py). canvas_tile: a 32x46
    input at x4 (padded to 160x192, the width by another 32), latent tiles of input_size / 8 with the release's
    Gaussian, the seed's draws in the script's order (DDIM: from pure noise, with the negative prompt and CFG 7).
    _old: DDPM from pure noise (start="noise"), the third draw, on a 128x128 input taken as it is."""
    from diffsr.images import Picture
    from diffsr.methods.stablesr import NEGATIVE_PROMPT

    case = release_runs[name]
    method = StableSR(stablesr.backbone, stablesr.unet, stablesr.encoder, stablesr.autoencoder,
                      process_size=release_runs["input_size"])
    with torch.no_grad():
        assert max_diff(method.backbone.encode_prompt([""]), release_runs["text_empty"]) <= 1e-5
        assert max_diff(method.backbone.encode_prompt([NEGATIVE_PROMPT]), release_runs["text_negative"]) <= 1e-5
    knobs = dict(steps=case["steps"], sampler=case["script"], fidelity=case["dec_w"], color_fix="none",
                 tile_overlap=release_runs["tile_overlap"], release_gaussian=True)
    if case["scale"] is not None:
        knobs["guidance_scale"] = case["scale"]
    if case["script"] == "old":
        knobs.update(sampler="ddpm", start="noise")
    lr = case.get("lr", release_runs["lr"]).numpy()
    out = method.upscale(Picture(lr), scale=case["upscale"], seed=case["seed"], **knobs).rgb
    difference = (torch.from_numpy(out).float() - case["out"].float()).abs()
    print(f"{name}: max {difference.max().item():.3f}, mean {difference.mean().item():.4f} levels of 255")
    assert out.shape == tuple(case["out"].shape)
    assert difference.max().item() <= 1


@pytest.mark.parametrize("name", ["ddpm_canvas_tile_adain", "ddpm_canvas_tile_wavelet", "ddpm_old_adain",
                                  "ddpm_old_wavelet"])
def test_whole_run_matches_the_release_script_with_its_colour_fix(stablesr, files, name):
    """The same scripts with --colorfix_type adain / wavelet (make_release_runs.py colorfix): they fix the decoded
    image before clamping it, and the canvas script fixes the padded image against the padded input before
    cropping the padding away."""
    from diffsr.images import Picture

    runs = parity_fixture("stablesr/stablesr_release_colorfix.pt", *release_files(files))
    case = runs[name]
    method = StableSR(stablesr.backbone, stablesr.unet, stablesr.encoder, stablesr.autoencoder,
                      process_size=runs["input_size"])
    knobs = dict(steps=case["steps"], sampler="ddpm", fidelity=case["dec_w"], tile_overlap=runs["tile_overlap"],
                 release_gaussian=True, **({"start": "noise"} if case["script"] == "old" else {}))
    lr = case.get("lr", runs["lr"]).numpy()
    out = method.upscale(Picture(lr), scale=case["upscale"], seed=case["seed"], color_fix=case["colorfix"],
                         **knobs).rgb
    difference = (torch.from_numpy(out).float() - case["out"].float()).abs()
    print(f"{name}: max {difference.max().item():.3f}, mean {difference.mean().item():.4f} levels of 255")
    assert out.shape == tuple(case["out"].shape)
    assert difference.max().item() <= 1


def test_checkpoint_module_reads_writes_and_detects(files, tmp_path):
    """checkpoints.stablesr: detect either file of the pair and the safetensors copy (not a foreign file); write
    gives back what read took, in the release's format and as the copy."""
    from diffsr.backbone import load_backbone
    from diffsr.checkpoints import stablesr as checkpoint

    base, weights = files
    cfw = weights.parent / CFW_NAME
    assert checkpoint.detect(weights) and checkpoint.detect(cfw)
    assert not checkpoint.detect({"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(1)}})
    backbone = load_backbone(base)
    configs = backbone.unet.config, backbone.vae.config, backbone.unet.config.norm_num_groups
    parts = checkpoint.read(weights, *configs)
    assert parts.unet and parts.encoder and parts.vae and not parts.fusion and parts.alphas_cumprod is not None
    for writer, name in ((checkpoint.write, "copy.ckpt"), (checkpoint.write_copy, "copy.safetensors")):
        again = checkpoint.read(writer(parts, tmp_path / name), *configs)
        assert checkpoint.detect(tmp_path / name) and again.encoder_config == parts.encoder_config
        for name in ("unet", "encoder", "vae"):
            ours, theirs = getattr(parts, name), getattr(again, name)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    cfw_parts = checkpoint.read_cfw(cfw, *configs)
    assert cfw_parts.fusion and not cfw_parts.unet
    with pytest.raises(WeightsError, match="no unet weights"):
        checkpoint.read_model(cfw, *configs)


def test_variants_come_from_the_registry_not_from_substrings(files, tmp_path):
    """The turbo defaults (4 steps) follow the registry's file name, exact, as the release file or its copy;
    a name that merely contains 'turbo' gets the general defaults."""
    from diffsr.checkpoints.stablesr import release_item

    assert release_item("x/stablesr_turbo.ckpt").name == "stablesr-turbo"
    assert release_item("converted/stablesr-turbo/stablesr_turbo.safetensors").name == "stablesr-turbo"
    assert release_item("stablesr_768v_000139.ckpt").base == "sd21-768v"
    assert release_item("my_turbo_finetune.ckpt") is None
    base, weights = files
    (tmp_path / CFW_NAME).symlink_to(weights.parent / CFW_NAME)
    for name, steps in (("stablesr_turbo.ckpt", 4), ("my_turbo_finetune.ckpt", 200)):
        link = tmp_path / name
        link.symlink_to(weights)
        model = StableSR.load(base, link)
        assert model.settings({}).steps == steps and model.denoiser_passes({}) == steps
        assert model.denoiser_passes({"steps": 7}) == 7


def test_knobs_are_the_release_defaults_checked_once(stablesr):
    knobs = StableSR.Knobs
    assert StableSR.knob_names() == knobs.names() == (
        "prompt", "negative_prompt", "steps", "sampler", "guidance_scale", "fidelity", "eta", "start")
    settings = stablesr.settings({"sampler": None})
    assert (settings.steps, settings.sampler, settings.fidelity, settings.guidance_scale) == (200, "ddpm", 0.5, 1.0)
    assert settings.start_latent == "lr" and stablesr.settings({"sampler": "ddim"}).start_latent == "noise"
    assert stablesr.settings({"sampler": "ddim", "start": "lr"}).start_latent == "lr"
    for bad, message in (({"steps": 0}, "steps must be at least 1"), ({"start": "x"}, "unknown start 'x'"),
                         ({"fidelity": 2}, "fidelity must be at most 1"), ({"eta": -1}, "eta must be at least 0")):
        with pytest.raises(UsageError, match=message):
            stablesr.check_knobs(bad)
