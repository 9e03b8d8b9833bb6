"""S3Diff: parity with the authors' code, degradation-guided LoRA, batched guidance, release format, bad input."""

import copy
import math

import numpy as np
import pytest
import torch

import diffsr
from diffsr.errors import UsageError, WeightsError
from conftest import parity_fixture, smooth_image



@pytest.fixture(scope="module")
def models(tiny_base, s3diff_weights):
    """conftest's tiny SD-Turbo-shaped base with random s3diff.pkl and de_net.pth (seed 0, as in the fixture)."""
    return tiny_base, s3diff_weights


@pytest.fixture(scope="module")
def s3diff(models):
    base, weights = models
    return diffsr.load_upscaler("s3diff", base=base, weights=weights)


# -- parity with the authors' code (tests/fixtures/s3diff/make_parity_fixture.py) ------------------------

def test_matches_the_release_on_the_same_tiny_weights(models, s3diff):
    from diffsr.images import as_picture
    from diffsr.methods.base import color_fix_and_clamp
    from diffsr.methods.s3diff import GUIDANCE_SCALE, NEGATIVE_PROMPT, POSITIVE_PROMPT

    base, weights = models
    fixture = parity_fixture("s3diff/parity.pt", base, weights, weights.parent / "de_net.pth")
    for image, scores in ((fixture["lr"], fixture["scores"]), (fixture["lr_noise"], fixture["scores_noise"])):
        estimated = torch.tensor(s3diff.estimate_degradation(image.numpy()))
        assert (estimated - scores[0]).abs().max() <= 1e-5
    assert (GUIDANCE_SCALE, POSITIVE_PROMPT, NEGATIVE_PROMPT) == (
        fixture["guidance_scale"], fixture["positive_prompt"], fixture["negative_prompt"])
    prepared = s3diff.preprocess(as_picture(fixture["lr"].numpy()), fixture["scale"])
    scores = tuple(fixture["scores"][0].tolist())
    cases = [("sr_mean", scores, False), ("sr_sample", scores, True), ("sr_override", fixture["override"], False)]
    for key, degradation, sample in cases:
        generator = torch.Generator().manual_seed(fixture["sample_seed"])
        ours = s3diff.restore(prepared.lr, generator, degradation=degradation, sample_posterior=sample)
        difference = (ours - fixture[key]).abs().max().item()
        print(f"{key}: max abs difference to the release {difference:.2e}")
        assert difference <= 1e-4, key
        if key == "sr_mean":
            fixed = color_fix_and_clamp(ours, prepared.lr, "wavelet")
            assert (fixed - fixture["sr_mean_wavelet"]).abs().max() <= 1e-4


def test_upscale_runs_the_whole_flow(s3diff):
    out = s3diff(smooth_image(16, 20), scale=4)
    assert out.size == (80, 64) and out.mode == "RGB"
    assert s3diff(smooth_image(7, 5), scale=2.5).size == (12, 18)
    assert s3diff(smooth_image(3, 2), scale=1).size == (2, 3)  # padded by repeated reflection


# -- degradation-guided LoRA ---------------------------------------------------------------------------

class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.proj(self.conv(x).flatten(2).transpose(1, 2))


def _toy_pair(rank=4):
    """The same toy model with plain peft LoRA and with degradation-guided LoRA, equal weights."""
    from peft import LoraConfig, inject_adapter_in_model

    from diffsr.lora import add_degradation_lora

    torch.manual_seed(0)
    plain = _Toy()
    guided = copy.deepcopy(plain)
    config = LoraConfig(r=rank, lora_alpha=8, init_lora_weights="gaussian", target_modules=["conv", "proj"])
    inject_adapter_in_model(config, plain, adapter_name="default")
    modulation = add_degradation_lora(guided, ["conv", "proj"], rank, "default", lambda name: int(name == "proj"))
    for name, param in plain.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide any difference
            param.data.normal_()
    guided.load_state_dict(plain.state_dict())
    return plain, guided, modulation


def test_identity_modulation_equals_plain_peft_lora():
    plain, guided, modulation = _toy_pair()
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad(), modulation.use(torch.eye(4).expand(1, 2, 4, 4)):
        assert torch.allclose(guided(x), plain(x), atol=1e-6)
    with torch.no_grad(), modulation.use(2 * torch.eye(4).expand(1, 2, 4, 4)):
        assert (guided(x) - plain(x)).abs().max() > 1e-2


def test_modulation_is_per_sample_and_per_block():
    _, guided, modulation = _toy_pair()
    x = torch.randn(2, 3, 5, 5)
    matrices = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        with modulation.use(matrices):
            together = guided(x)
        for i in range(2):
            with modulation.use(matrices[i:i + 1]):
                assert torch.allclose(together[i:i + 1], guided(x[i:i + 1]), atol=1e-5)
        with modulation.use(matrices[:, [0, 0]]):  # the Linear layer (block 1) now sees block 0's C
            assert (guided(x) - together).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="without its matrices"):
        guided(x)
    with pytest.raises(UsageError, match="cannot be merged"):
        guided.conv.merge()


def test_release_block_ids():
    from diffsr.nets.s3diff_modulation import unet_block, vae_block

    assert unet_block("down_blocks.2.resnets.0.conv1") == 2
    assert unet_block("mid_block.attentions.0.proj_in") == 4
    assert unet_block("up_blocks.3.attentions.1.transformer_blocks.0.ff.net.2") == 8
    assert unet_block("conv_out") == 9
    assert vae_block("encoder.down_blocks.1.downsamplers.0.conv") == 1
    assert vae_block("encoder.mid_block.attentions.0.to_q") == 4
    assert vae_block("encoder.conv_in") == vae_block("encoder.conv_out") == 5


# -- classifier-free guidance ---------------------------------------------------------------------------

def test_batched_guidance_equals_two_calls_and_scale_one_skips_the_negative(s3diff):
    from diffsr.methods.s3diff import NEGATIVE_PROMPT, POSITIVE_PROMPT, TIMESTEP, S3DiffKnobs

    unet, degradation = s3diff.backbone.unet, (0.3, 0.6)
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # two tiles of one image
    text, negative = s3diff.backbone.encode_prompt([POSITIVE_PROMPT, NEGATIVE_PROMPT]).chunk(2)
    batches = []
    hook = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad(), s3diff.unet_modulation.use(s3diff.conditioner.matrices("unet", torch.tensor([degradation]))):
            guided = s3diff.noise(latent, text, negative, 1.07)
            assert batches == [4]  # one UNet call for both branches
            positive_only = s3diff.noise(latent, text, negative, 1)
            assert batches == [4, 2]  # no negative branch
            eps_pos = unet(latent, TIMESTEP, encoder_hidden_states=text.expand(2, -1, -1)).sample
            eps_neg = unet(latent, TIMESTEP, encoder_hidden_states=negative.expand(2, -1, -1)).sample
    finally:
        hook.remove()
    assert torch.allclose(guided, eps_neg + 1.07 * (eps_pos - eps_neg), atol=1e-5)
    assert torch.allclose(positive_only, eps_pos, atol=1e-5)
    # restore's guidance is this one: the whole flow gives the same image at guidance_scale 1.07 given explicitly
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    knobs = S3DiffKnobs(degradation=degradation).as_dict()
    assert torch.equal(s3diff.restore(lr, torch.Generator(), **knobs),
                       s3diff.restore(lr, torch.Generator(), **{**knobs, "guidance_scale": 1.07}))
    assert not torch.equal(s3diff.restore(lr, torch.Generator(), **knobs),
                           s3diff.restore(lr, torch.Generator(), **{**knobs, "guidance_scale": 1}))


# -- knobs -----------------------------------------------------------------------------------------------

def test_degradation_override_and_display(s3diff, capsys):
    image = smooth_image(16, 16)
    blur, noise = s3diff.estimate_degradation(image)
    assert 0 <= blur <= 1 and 0 <= noise <= 1
    from diffsr.images import as_picture

    assert s3diff.degradation_scores(as_picture(image), (0.2, None)) == (0.2, noise)
    assert s3diff.degradation_scores(as_picture(image), (None, 0.9)) == (blur, 0.9)
    estimated = np.asarray(s3diff(image, show_degradation=True))
    assert f"blur {blur:.4f} (estimated), noise {noise:.4f} (estimated)" in capsys.readouterr().out
    same = np.asarray(s3diff(image, degradation=(blur, noise)))
    other = np.asarray(s3diff(image, degradation=(1.0, 0.0), show_degradation=True))
    assert "blur 1.0000 (given), noise 0.0000 (given)" in capsys.readouterr().out
    np.testing.assert_array_equal(estimated, same)
    assert np.abs(estimated.astype(int) - other).max() > 0


def test_knobs_are_the_release_defaults():
    from diffsr.methods.s3diff import NEGATIVE_PROMPT, POSITIVE_PROMPT, S3Diff

    assert S3Diff.knob_names() == S3Diff.Knobs.names() == (
        "prompt", "negative_prompt", "guidance_scale", "degradation", "show_degradation", "sample_posterior")
    assert S3Diff.Knobs.from_call({}).as_dict() == dict(
        prompt=POSITIVE_PROMPT, negative_prompt=NEGATIVE_PROMPT, guidance_scale=1.07, degradation=None,
        show_degradation=False, sample_posterior=False)
    assert S3Diff.Knobs.from_call({"degradation": (1, None)}).degradation == (1.0, None)
    with pytest.raises(UsageError, match="degradation blur must be at most 1 and at least 0, got 1.5"):
        S3Diff.Knobs.from_call({"degradation": (1.5, 0.2)})


def test_bad_degradation_and_guidance_values(s3diff):
    image = smooth_image(8, 8)
    for bad in [(1.5, 0.2), (0.2, -0.1), (math.nan, 0.2), (0.5,), "high", (0.1, "x")]:
        with pytest.raises(UsageError, match="degradation"):
            s3diff(image, degradation=bad)
    for bad in (math.nan, -1, math.inf, "x"):
        with pytest.raises(UsageError, match="guidance_scale"):
            s3diff(image, guidance_scale=bad)
    with pytest.raises(UsageError, match="no option"):
        s3diff(image, fidelity=0.5)


# -- release format and bad weights ----------------------------------------------------------------------

def test_tiny_weights_have_the_release_format(models, s3diff):
    from diffsr.checkpoints import detect
    from diffsr.checkpoints.s3diff import KEYS as WEIGHT_KEYS, UNET_TARGETS, VAE_TARGETS

    _, weights = models
    state = torch.load(weights)
    assert sorted(state) == sorted(WEIGHT_KEYS) and detect(state) == "s3diff"
    assert state["unet_lora_target_modules"] == UNET_TARGETS and state["vae_lora_target_modules"] == VAE_TARGETS
    assert (state["rank_unet"], state["rank_vae"]) == (32, 16)
    assert isinstance(state["w"], torch.nn.Parameter) and state["w"].shape == (64,)
    unet_keys, vae_keys = state["state_dict_unet"], state["state_dict_vae"]
    assert {"conv_in.weight", "conv_in.bias"} <= set(unet_keys)  # trained in full, not wrapped
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in unet_keys if "conv_in" not in k)
    assert all(k.startswith("encoder.") and ".vae_skip." in k for k in vae_keys)
    assert state["state_dict_unet_fuse_mlp"]["weight"].shape == (32 * 32, 320)
    assert state["state_embeddings"]["state_dict_unet_block"]["weight"].shape == (10, 64)
    assert state["state_embeddings"]["state_dict_vae_block"]["weight"].shape == (6, 64)
    de_net = torch.load(weights.parent / "de_net.pth")
    assert len(de_net) == 80 and sum(v.numel() for v in de_net.values()) == 2_351_362
    scaling = {module.scaling["default"] for module in s3diff.backbone.unet.modules() if hasattr(module, "scaling")}
    assert scaling == {0.25}  # peft alpha 8 / rank 32


def test_release_files_read_and_write_back_unchanged(models, tmp_path):
    from diffsr.checkpoints import s3diff as release
    from diffsr.testing import weights_digest

    _, weights = models
    de_net = weights.parent / "de_net.pth"
    assert release.detect(weights) and release.detect(torch.load(weights)) and not release.detect(de_net)
    parts = release.read(weights)
    assert (parts.rank_unet, parts.rank_vae) == (32, 16) and parts.conditioner["w"].shape == (64,)
    assert "unet_fuse_mlp.weight" in parts.conditioner and "vae_block_embeddings.weight" in parts.conditioner
    written = release.write(parts, tmp_path / "s3diff.pkl")
    assert list(torch.load(written)) == list(torch.load(weights))  # the release's key order
    assert weights_digest(written) == weights_digest(weights)
    copy = release.write_de_net(release.read_de_net(de_net), tmp_path / "de_net.pth")
    assert weights_digest(copy) == weights_digest(de_net)
    assert release.find_de_net(written) == copy and release.find_de_net(written, "elsewhere.pth").name == "elsewhere.pth"
    with pytest.raises(UsageError, match="de_net"):
        release.find_de_net(None)


def test_bad_weights_get_clear_errors(models, tmp_path):
    from diffsr.testing import make_tiny_weights

    base, weights = models
    osediff = make_tiny_weights("osediff", base, tmp_path / "osediff.pkl")
    with pytest.raises(WeightsError, match="osediff"):
        diffsr.load_upscaler("s3diff", base=base, weights=osediff, de_net=weights.parent / "de_net.pth")
    lonely = tmp_path / "alone" / "s3diff.pkl"
    lonely.parent.mkdir()
    lonely.write_bytes(weights.read_bytes())
    with pytest.raises(WeightsError, match=r"de_net\.pth.*not found"):
        diffsr.load_upscaler("s3diff", base=base, weights=lonely)
    with pytest.raises(WeightsError, match="not the degradation estimator"):
        diffsr.load_upscaler("s3diff", base=base, weights=weights, de_net=weights)
    truncated = dict(torch.load(weights.parent / "de_net.pth"))
    truncated.pop("fc_degree.1.2.bias")
    torch.save(truncated, tmp_path / "de_net_short.pth")
    with pytest.raises(WeightsError, match="missing 1 tensors"):
        diffsr.load_upscaler("s3diff", base=base, weights=weights, de_net=tmp_path / "de_net_short.pth")
    state = torch.load(weights)
    del state["state_embeddings"]
    torch.save(state, tmp_path / "incomplete.pkl")
    with pytest.raises(WeightsError, match="state_embeddings"):
        diffsr.load_upscaler("s3diff", base=base, weights=tmp_path / "incomplete.pkl", de_net=weights.parent / "de_net.pth")
    with pytest.raises(UsageError, match="cannot be merged"):
        diffsr.load_upscaler("s3diff", base=base, weights=weights, merge_lora=True)


# -- command line -----------------------------------------------------------------------------------------

def test_command_line(models, tmp_path, capsys):
    from PIL import Image

    from diffsr.cli import main

    base, weights = models
    Image.fromarray(smooth_image(12, 12)).save(tmp_path / "in.png")
    common = ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--method", "s3diff",
              "--base", str(base), "--weights", str(weights), "--quiet"]
    assert main(common + ["--show-degradation", "--degradation-blur", "0.3", "--guidance-scale", "1"]) == 0
    assert "in.png: degradation blur 0.3000 (given), noise" in capsys.readouterr().out
    assert Image.open(tmp_path / "out" / "in.png").size == (48, 48)
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--degradation-noise", "1.2"])
    assert exit_info.value.code == 2 and "outside [0, 1]" in capsys.readouterr().err
