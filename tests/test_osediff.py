import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import diffsr
from diffsr.errors import BaseModelError, UsageError, WeightsError
from conftest import smooth_image


@pytest.mark.parametrize("scale, size, expected", [
    (4, (40, 32), (160, 128)),  # short side < 512 // 4: enlarged, processed, resized back
    (1, (33, 27), (33, 27)),
    (2.5, (30, 20), (75, 50)),
])
def test_output_has_the_requested_size(osediff, scale, size, expected):
    width, height = size
    out = osediff(smooth_image(height, width), scale=scale)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert out.size == expected


def lr_tensor(size=64, seed=0):
    """A small network input (the preprocessing is tested separately; these tests are about restore)."""
    return torch.from_numpy(smooth_image(size, size, seed)).permute(2, 0, 1)[None].float() / 255


@torch.no_grad()
def restore(upscaler, seed=0, **knobs):
    return upscaler.restore(lr_tensor(), torch.Generator().manual_seed(seed), **knobs)


def test_same_seed_same_result_and_posterior_sampling_uses_the_seed(osediff):
    torch.testing.assert_close(restore(osediff, seed=1), restore(osediff, seed=2), rtol=0, atol=0)  # mean: no draw
    sampled = restore(osediff, seed=1, sample_posterior=True)
    torch.testing.assert_close(sampled, restore(osediff, seed=1, sample_posterior=True), rtol=0, atol=0)
    assert (sampled - restore(osediff, seed=2, sample_posterior=True)).abs().max() > 1e-4


def test_prompt_changes_the_result(osediff):
    assert (restore(osediff) - restore(osediff, prompt="a red car")).abs().max() > 1e-4


def test_lora_is_applied(tiny_base, osediff, osediff_weights):
    """Zeroing the adapters' B matrices must change the output: the LoRA is really in the path."""
    state = torch.load(osediff_weights)
    for key in list(state["state_dict_unet"]):
        if "lora_B" in key:
            state["state_dict_unet"][key] = torch.zeros_like(state["state_dict_unet"][key])
    path = osediff_weights.parent / "osediff_zero_b.pkl"
    torch.save(state, path)
    no_lora = diffsr.load_upscaler("osediff", base=tiny_base, weights=path, tagger=None)
    assert (restore(no_lora) - restore(osediff)).abs().max() > 1e-4


def lora_layers(upscaler) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    models = (upscaler.backbone.unet, upscaler.backbone.vae)
    return [module for model in models for module in model.modules() if isinstance(module, BaseTunerLayer)]


def test_lora_is_merged_by_default_with_the_unmerged_output(tiny_base, osediff_weights, osediff):
    """The default folds the LoRA into the base weights (faster: benchmarks/results/speed_vs_release.md);
    merge_lora=False keeps the adapters apart. Both give the same output within float32 error."""
    unmerged = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, merge_lora=False, tagger=None)
    assert lora_layers(osediff) and all(layer.merged for layer in lora_layers(osediff))
    assert lora_layers(unmerged) and not any(layer.merged for layer in lora_layers(unmerged))
    assert (restore(osediff) - restore(unmerged)).abs().max().item() < 1e-4
    assert (restore(osediff, sample_posterior=True) - restore(unmerged, sample_posterior=True)).abs().max() < 1e-4


def test_bfloat16_runs_close_to_float32(tiny_base, osediff_weights, osediff):
    low = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, dtype="bfloat16", tagger=None)
    assert low.backbone.unet.dtype == torch.bfloat16
    result = restore(low)
    assert result.dtype == torch.float32 and (result - restore(osediff)).abs().mean() < 0.05


def test_alpha_is_upscaled_separately(osediff):
    rgba = np.dstack([smooth_image(20, 24), np.full((20, 24), 128, np.uint8)])
    rgba[:, :12, 3] = 0
    out = osediff(rgba, scale=2)
    assert out.mode == "RGBA" and out.size == (48, 40)
    alpha = np.asarray(out)[:, :, 3]
    assert alpha[:, :20].max() < 10 and alpha[:, 28:].min() > 120


def test_16_bit_input_gives_16_bit_output_and_color_fix_matters(osediff):
    deep = smooth_image(16, 16).astype(np.uint16) * 257
    adain = osediff.upscale(deep, scale=8)
    assert adain.rgb.dtype == np.uint16 and adain.rgb.shape == (128, 128, 3)
    wavelet = osediff.upscale(deep, scale=8, color_fix="wavelet")
    assert np.abs(adain.rgb.astype(int) - wavelet.rgb).max() > 257


def test_bad_knobs_and_scales(osediff):
    image = smooth_image(8, 8)
    with pytest.raises(UsageError, match="scale 9"):
        osediff(image, scale=9)
    with pytest.raises(UsageError, match="scale 0.5"):
        osediff(image, scale=0.5)
    with pytest.raises(UsageError, match="no option guidance"):
        osediff(image, guidance=3)
    with pytest.raises(UsageError, match="prompt must be text, got 3"):  # values: one line naming the knob
        osediff(image, prompt=3)
    with pytest.raises(UsageError, match="sample_posterior must be true or false, got 'yes'"):
        osediff(image, sample_posterior="yes")
    with pytest.raises(UsageError, match="unknown color fix 'sepia'"):
        osediff(image, color_fix="sepia")
    # Large inputs are no longer refused: they go through the tiler (tests/test_tiling.py); bad tile
    # settings are the usage errors now.
    with pytest.raises(UsageError, match="tile_size 12 must be a positive multiple of 8"):
        osediff(image, tile_size=12)


def test_unknown_method():
    with pytest.raises(UsageError, match="unknown method 'esrgan'.*osediff"):
        diffsr.load_upscaler("esrgan", base="x", weights="y")
    assert "osediff" in diffsr.list_methods()


def test_bad_weights_files(tiny_base, tmp_path, osediff_weights):
    with pytest.raises(WeightsError, match="weights file not found"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=tmp_path / "none.pkl")
    (tmp_path / "corrupt.pkl").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(WeightsError, match="corrupt.pkl: not a readable weights file"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=tmp_path / "corrupt.pkl")
    data = osediff_weights.read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.pkl: not a readable weights file"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=tmp_path / "cut.pkl")
    s3diff_like = {"unet_lora_target_modules": [], "vae_lora_target_modules": [], "state_dict_unet": {}, "w": torch.zeros(64)}
    torch.save(s3diff_like, tmp_path / "s3diff.pkl")
    with pytest.raises(WeightsError, match="s3diff.pkl: this is a s3diff checkpoint, not osediff weights"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=tmp_path / "s3diff.pkl")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a known release format"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=tmp_path / "other.pth")

def test_release_file_reads_writes_and_detects(tmp_path, osediff_weights):
    from diffsr.checkpoints import osediff as checkpoint

    parts = checkpoint.read(osediff_weights)
    assert (parts.targets.rank_unet, parts.targets.rank_vae) == (4, 4) and all(parts.targets.unet) and parts.targets.vae
    assert checkpoint.detect(osediff_weights) and not checkpoint.detect({"state_dict": {"x": torch.zeros(1)}})
    checkpoint.write(parts, tmp_path / "again.pkl")
    again = checkpoint.read(tmp_path / "again.pkl")
    assert again.targets == parts.targets
    for ours, theirs in ((again.unet_state, parts.unet_state), (again.vae_state, parts.vae_state)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert list(torch.load(tmp_path / "again.pkl")) == list(torch.load(osediff_weights))  # the release's keys


@pytest.mark.parametrize("change, message", [
    (lambda state: state.pop("rank_vae"), "an osediff file without 'rank_vae'"),
    (lambda state: state.update(rank_unet=True), r"its LoRA ranks \(True, 4\) are not positive whole numbers"),
    (lambda state: state.update(unet_lora_others_modules="conv_in"), "its LoRA target lists are not lists of module"),
    (lambda state: state.update(state_dict_vae=[1]), "'state_dict_vae' is not a dict of tensors"),
])
def test_malformed_release_files_are_one_line(tiny_base, tmp_path, osediff_weights, change, message):
    state = torch.load(osediff_weights)
    change(state)
    torch.save(state, tmp_path / "bad.pkl")
    with pytest.raises(WeightsError, match="bad.pkl: " + message):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=tmp_path / "bad.pkl", tagger=None)


def test_no_weights_means_the_registry_default(tiny_base, tmp_path, monkeypatch):
    # Without weights the registry's default is used (issue 15); offline and not cached, one line names it
    # and the command that fetches it.
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match="'osediff' is not in the cache .*`diffsr weights fetch osediff`"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=None, offline=True)


def test_weights_for_another_base_are_named(tmp_path, osediff_weights):
    from diffsr.testing import make_tiny_base

    state = torch.load(osediff_weights)
    key = next(k for k in state["state_dict_unet"] if "lora_A" in k)
    state["state_dict_unet"][key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "osediff.pkl")
    base = make_tiny_base(tmp_path / "base")
    with pytest.raises(WeightsError, match="has shape .* another base model"):
        diffsr.load_upscaler("osediff", base=base, weights=tmp_path / "osediff.pkl")


def test_incomplete_base_folder_is_named(tmp_path, tiny_base, osediff_weights):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(BaseModelError, match="broken: base model folder is missing 'vae/'"):
        diffsr.load_upscaler("osediff", base=broken, weights=osediff_weights)
    with pytest.raises(BaseModelError, match="does not exist"):
        diffsr.load_upscaler("osediff", base=tmp_path / "nothing-here", weights=osediff_weights)


def test_a_tagger_is_pluggable_and_a_missing_one_is_named(tiny_base, osediff_weights, osediff):
    seen = []

    def tagger(images):
        seen.append(tuple(images.shape))
        return ["cat, grass"]

    tagged = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger=tagger)
    assert tagged.prompt_for(lr_tensor(), "sharp") == "cat, grass, sharp,"  # the release's format
    assert seen == [(1, 3, 64, 64)]
    with pytest.raises(UsageError, match="no tagger named 'blip'"):  # ram and dape exist now (test_taggers.py)
        diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger="blip")


def test_unavailable_device_and_dtype_are_named(tiny_base, osediff_weights):
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="device 'cuda' is not available"):
            diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, device="cuda")
    with pytest.raises(UsageError, match="unknown device 'gpu0'"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, device="gpu0")
    with pytest.raises(UsageError, match="unknown dtype 'float8'"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, dtype="float8")


def test_auto_dtype_is_float16_on_cuda_and_float32_elsewhere(tiny_base, osediff_weights):
    from diffsr.backbone import resolve_dtype

    assert resolve_dtype("auto", "cuda:1") == torch.float16  # the releases' GPU setting
    assert resolve_dtype("auto", "cpu") == resolve_dtype("auto", "mps") == torch.float32
    assert diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights).dtype == torch.float32


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_hub_ids_resolve_through_the_huggingface_cache(tmp_path, tiny_base, osediff_weights):
    """A hub id loads like any diffusers model: here from a populated offline cache (no network).
    In a subprocess, because the libraries read the cache location when they are imported."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someone--sd21-tiny"
    shutil.copytree(tiny_base, repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = (f"import diffsr; up = diffsr.load_upscaler('osediff', base='someone/sd21-tiny', weights={str(osediff_weights)!r});"
            "print(tuple(up.backbone.unet.config.block_out_channels))\n"
            "try:\n diffsr.load_upscaler('osediff', base='nobody/nothing', weights=" + repr(str(osediff_weights)) + ")\n"
            "except diffsr.BaseModelError as e: print(e)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "(32, 64, 64, 64)"
    assert lines[1].startswith("nobody/nothing: cannot load the base model (hub id)")
