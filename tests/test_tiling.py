"""Tiling: latent aggregation, tiled VAE, the automatic choice and bad input (diffsr.tiling, issue #3)."""

import copy
import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffsr
from diffsr import tiling
from diffsr.errors import UsageError
from diffsr.tiling import TilingOptions

BIG_BUDGET = 4.0  # GB: plenty for the tiny model, so the exact VAE mode is chosen


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from diffsr.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiling") / "sd21-tiny")


@pytest.fixture(scope="module")
def backbone(base):
    from diffsr.backbone import load_backbone

    return load_backbone(base)


@pytest.fixture(scope="module")
def upscaler(base):
    from diffsr.testing import make_tiny_weights

    weights = make_tiny_weights("osediff", base, base.parent / "osediff.pkl")
    return diffsr.load_upscaler("osediff", base=base, weights=weights)


def smooth(shape, seed=0, cells=4):
    """Smooth random field (bicubic upsampling of a coarse grid), like an image or its latent."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((*shape[:-2], cells, cells), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape[-2:], mode="bicubic", align_corners=False)


def seam_ratio(x: torch.Tensor, borders_y, borders_x) -> float:
    """Mean |gradient| across tile borders divided by the mean |gradient| everywhere else."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()  # dy[i] is the step from row i to row i+1
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    on_y = torch.zeros(dy.shape[-2], dtype=torch.bool)
    on_y[[b - 1 for b in borders_y]] = True
    on_x = torch.zeros(dx.shape[-1], dtype=torch.bool)
    on_x[[b - 1 for b in borders_x]] = True
    border = torch.cat([dy[..., on_y, :].flatten(), dx[..., on_x].flatten()]).mean()
    rest = torch.cat([dy[..., ~on_y, :].flatten(), dx[..., ~on_x].flatten()]).mean()
    return (border / rest).item()


def tile_borders(size, tile, overlap, unit=1):
    starts = tiling.tile_starts(size, tile, overlap)
    edges = {s for s in starts[1:]} | {s + tile for s in starts[:-1]}
    return sorted(e * unit for e in edges if 0 < e < size)


# -- grid and weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size, tile, overlap", [(96, 96, 32), (100, 96, 32), (512, 96, 32), (70, 24, 8)])
def test_tiles_cover_the_latent_and_snap_to_the_edge(size, tile, overlap):
    starts = tiling.tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # at least `overlap` shared


def test_gaussian_is_symmetric_by_default_and_off_centre_as_released():
    weights = tiling.gaussian_weights(8, 6)
    torch.testing.assert_close(weights, weights.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(weights, weights.flip(1), rtol=0, atol=0)
    released = tiling.gaussian_weights(8, 6, release=True)
    assert released[:, 0].argmax() == 4  # peak at H/2 in y ...
    torch.testing.assert_close(released, released.flip(1), rtol=0, atol=0)  # ... but centred in x
    assert not torch.allclose(released, weights)


# -- latent aggregation --------------------------------------------------------------------------------


def test_aggregation_merges_a_pointwise_denoiser_exactly_and_batches_tiles():
    latent, condition = smooth((2, 4, 40, 56), 1), smooth((2, 4, 40, 56), 2)
    batches = []

    def denoise(x, c):
        batches.append(x.shape[0])
        return 2 * x + c

    merged = tiling.aggregate(denoise, latent, condition, tile=16, overlap=8, tile_batch=3)
    torch.testing.assert_close(merged, 2 * latent + condition, rtol=0, atol=1e-5)
    tiles = len(tiling.tile_starts(40, 16, 8)) * len(tiling.tile_starts(56, 16, 8))
    assert sum(batches) == 2 * tiles and max(batches) == 2 * 3  # batch 2 latent, 3 tiles per call


def test_aggregation_on_one_tile_is_the_untiled_result_exactly(backbone):
    unet, text = backbone.unet, backbone.encode_prompt([""])
    latent = smooth((1, 4, 24, 32), 3)

    def denoise(x, _):
        return unet(x, 999, encoder_hidden_states=text.expand(len(x), -1, -1)).sample

    assert torch.equal(tiling.aggregate(denoise, latent, None, tile=32), denoise(latent, None))


def test_tile_batch_does_not_change_the_result(backbone):
    unet, text = backbone.unet, backbone.encode_prompt([""])
    latent = smooth((1, 4, 40, 40), 4)

    def denoise(x, _):
        return unet(x, 999, encoder_hidden_states=text.expand(len(x), -1, -1)).sample

    one = tiling.aggregate(denoise, latent, None, tile=24, overlap=8, tile_batch=1)
    four = tiling.aggregate(denoise, latent, None, tile=24, overlap=8, tile_batch=4)
    torch.testing.assert_close(one, four, rtol=0, atol=1e-4)


def test_aggregated_unet_output_has_no_seams_and_the_measure_sees_hard_seams(backbone):
    unet, text = backbone.unet, backbone.encode_prompt([""])
    latent = smooth((1, 4, 64, 64), 5, cells=6)

    def denoise(x, _):
        return unet(x, 999, encoder_hidden_states=text.expand(len(x), -1, -1)).sample

    tile, overlap = 32, 16
    borders = tile_borders(64, tile, overlap)
    blended = tiling.aggregate(denoise, latent, None, tile, overlap, tile_batch=8)
    ratio = seam_ratio(blended, borders, borders)
    # The same tiles pasted side by side without blending: the measure must flag those borders.
    pasted = torch.cat([torch.cat([denoise(latent[..., y:y + 32, x:x + 32], None) for x in range(0, 64, 32)], -1)
                        for y in range(0, 64, 32)], -2)
    hard = seam_ratio(pasted, [32], [32])
    print(f"latent seam ratio {ratio:.3f} (hard tiles: {hard:.3f})")
    assert ratio < 1.1
    assert hard > 1.1


def test_tiled_upscaling_has_no_seams(upscaler):
    rng = np.random.RandomState(0)
    low = smooth((1, 3, 128, 128), 6, cells=12)
    image = ((low[0].permute(1, 2, 0).numpy() * 40 + 128 + rng.normal(0, 4, (128, 128, 3))).clip(0, 255)
             .astype(np.uint8))
    # 128 px x 4 = 512 px, a 64x64 latent: 3x3 denoiser tiles, exact VAE over 16-row bands.
    tiled = upscaler(image, scale=4, tile_size=32, tile_overlap=16, vae_tile_size=16, max_memory=BIG_BUDGET)
    assert tiled.size == (512, 512)
    tiled = torch.from_numpy(np.asarray(tiled).astype(np.float32)).permute(2, 0, 1)
    borders = tile_borders(64, 32, 16, unit=8)
    ratio = seam_ratio(tiled, borders, borders)
    print(f"image seam ratio {ratio:.3f}")
    assert ratio < 1.1


# -- tiled VAE -------------------------------------------------------------------------------------------


@pytest.fixture
def spilled(monkeypatch):
    """The shapes of the maps spilled off the device while the test runs."""
    shapes = []
    original = tiling.SpilledMap.__init__

    def recording(self, shape, *args):
        shapes.append(tuple(shape))
        original(self, shape, *args)

    monkeypatch.setattr(tiling.SpilledMap, "__init__", recording)
    return shapes


@pytest.mark.parametrize("mode, budget, rows", [("exact", BIG_BUDGET, 8), ("bounded", 1e-6, 16)])
def test_tiled_vae_equals_untiled(backbone, spilled, mode, budget, rows):
    """Both tiled modes run row bands with whole-map GroupNorm statistics and attention: the untiled result.
    Exact keeps the maps on the device; bounded spills every map taller than a band (a temporary file on the
    CPU), reads it back band by band and merges the attention over key chunks. Sizes the bands do not divide
    (the encoder's input is 25 latent px high)."""
    vae = backbone.vae
    options = TilingOptions(vae_tile_size=rows, max_memory=budget)
    image = (smooth((1, 3, 200, 136), 7, cells=12) * 0.5).clamp(-1, 1)
    assert tiling.vae_plan(options, vae, (25, 17), False, "cpu", torch.float32) == (mode, rows)
    untiled = vae.encode(image).latent_dist
    tiled = tiling.vae_encode(vae, image, options)
    encode_diff = max((tiled.mean - untiled.mean).abs().max().item(),
                      (tiled.logvar - untiled.logvar).abs().max().item())
    encoder_maps = len(spilled)
    latent = smooth((1, 4, 40, 24), 8, cells=6)
    decode_diff = (tiling.vae_decode(vae, latent, options) - vae.decode(latent).sample).abs().max().item()
    print(f"{mode} VAE max abs diff: encode {encode_diff:.2e}, decode {decode_diff:.2e}; "
          f"maps spilled: encoder {encoder_maps}, decoder {len(spilled) - encoder_maps}")
    assert encode_diff < 1e-3 and decode_diff < 1e-3
    if mode == "exact":
        assert spilled == []
    else:
        assert encoder_maps > 5 and len(spilled) - encoder_maps > 5
        assert all(shape[2] > rows for shape in spilled)  # only maps taller than a band leave the device
        assert (1, 64, 40, 24) in spilled  # the mid-block's keys and values (one map)
        assert spilled.count((1, 32, 40, 24)) >= 2 * 3  # latent-size resnet maps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("written", ["bands", "row slices"])
def test_spilled_map_reads_back_the_rows_written(dtype, written):
    """Written as separate bands, or as row slices of a taller map (as the runner writes a band computed with
    its halo rows: not contiguous, written without a copy)."""
    taller = torch.randn((2, 5, 41, 11), generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = taller[:, :, 2:39]
    stored = tiling.SpilledMap(whole.shape, dtype, "cpu")
    for top, bottom in ((0, 10), (10, 13), (13, 37)):
        band = whole[:, :, top:bottom]
        stored.write(top, band.clone() if written == "bands" else band)
    for top, bottom in ((0, 37), (5, 20), (-3, 4), (30, 50)):
        band = stored.rows(top, bottom)
        assert band.is_contiguous() and band.dtype == dtype
        assert torch.equal(band, whole[:, :, max(top, 0):bottom])


def test_map_statistics_merged_over_bands_are_the_whole_maps():
    """GroupNorm statistics merged band by band (bands of any height, row slices, channel means far from zero,
    bfloat16 maps measured in float32) against float64 over the whole map."""
    from diffsr.tiling.norms import map_statistics

    generator = torch.Generator().manual_seed(0)
    taller = (torch.randn((2, 64, 42, 24), generator=generator) * 3
              + torch.randn((64, 1, 1), generator=generator) * 40)
    whole = taller[:, :, 1:41]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        whole = whole.to(dtype)
        mean, var = map_statistics([whole[:, :, a:b] for a, b in ((0, 13), (13, 30), (30, 31), (31, 40))], 32)
        groups = whole.double().reshape(2, 32, -1)
        assert mean.dtype == var.dtype == torch.float32
        torch.testing.assert_close(mean.double(), groups.mean(-1), rtol=tolerance, atol=1e-4)
        torch.testing.assert_close(var.double(), groups.var(-1, unbiased=False), rtol=tolerance, atol=0)


def test_bounded_vae_measures_spilled_maps_as_it_writes_them(backbone, monkeypatch):
    """The GroupNorm statistics of a spilled map are measured while its bands are written: no map is read back
    for them (only maps no taller than a band, held whole, are measured when normalised)."""
    from diffsr.tiling import vae_runner

    bands_read, original = [], vae_runner.map_statistics

    def counting(bands, groups):
        bands = list(bands)
        bands_read.append(len(bands))
        return original(bands, groups)

    monkeypatch.setattr(vae_runner, "map_statistics", counting)
    latent = smooth((1, 4, 40, 24), 8, cells=6)
    bounded = tiling.vae_decode(backbone.vae, latent, TilingOptions(vae_tile_size=8), mode="bounded")
    assert all(count == 1 for count in bands_read)
    bands_read.clear()
    exact = tiling.vae_decode(backbone.vae, latent, TilingOptions(vae_tile_size=8), mode="exact")
    assert max(bands_read) > 1  # the exact mode's maps, on the device, are measured when normalised
    torch.testing.assert_close(bounded, exact, rtol=0, atol=1e-4)


def test_a_full_disk_is_one_clear_error(monkeypatch):
    import errno

    from diffsr.errors import OutputError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)  # where the disk space is claimed
    with pytest.raises(OutputError, match="no space in .* for the bounded VAE mode's feature maps .*TMPDIR"):
        tiling.SpilledMap((1, 8, 64, 64), torch.float32, "cpu").write(0, torch.zeros((1, 8, 64, 64)))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_bounded_vae_closes_its_files(backbone):
    """The spilled maps' files close when the run ends (the encoder's kept features: when they are dropped)."""
    before = len(os.listdir("/proc/self/fd"))
    latent = smooth((1, 4, 40, 24), 8, cells=6)
    tiling.vae_decode(backbone.vae, latent, TilingOptions(vae_tile_size=8), mode="bounded")
    assert len(os.listdir("/proc/self/fd")) == before


def test_attention_over_key_chunks_equals_attention_over_all_keys():
    from diffsr.tiling.vae_runner import attend_in_chunks

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn((1, 2, n, 16), generator=generator) * 3 for n in (30, 70, 70))
    chunks = [(key[:, :, a:b], value[:, :, a:b]) for a, b in ((0, 25), (25, 50), (50, 70))]
    torch.testing.assert_close(attend_in_chunks(query, chunks, 0.25),
                               F.scaled_dot_product_attention(query, key, value, scale=0.25), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def cfw(base):
    """StableSR's CFW autoencoder (VAE + fusion layers), tiny random weights."""
    from diffsr.testing import make_tiny_weights

    weights = make_tiny_weights("stablesr", base, base.parent / "stablesr" / "stablesr_000117.ckpt")
    return diffsr.load_upscaler("stablesr", base=base, weights=weights).autoencoder


def test_stablesr_cfw_decoder_runs_under_the_tiled_vae(cfw, spilled):
    """The fusion layers take the encoder's features in every VAE mode, all equal to the untiled result; in
    bounded mode the features wait for the decoder off the device, and a bounded encode feeds an untiled decode."""
    image = (smooth((1, 3, 192, 128), 7, cells=12) * 0.5).clamp(-1, 1)
    z = smooth((1, 4, 24, 16), 8, cells=6)
    dist, features = cfw.encode(image)
    reference = cfw.decode(z, features, 0.5)
    assert (reference - cfw.decode(z, features, 0.0)).abs().max() > 1e-3  # the fusion is in the path

    diffs = {}
    for mode, budget in (("exact", BIG_BUDGET), ("bounded", 1e-6)):
        options = TilingOptions(vae_tile_size=8, max_memory=budget)
        assert tiling.vae_plan(options, cfw.vae, (24, 16), True, "cpu", torch.float32)[0] == mode
        tiled_dist, tiled_features = cfw.encode(image, options)
        assert all(isinstance(m, tiling.SpilledMap) == (mode == "bounded") for m in tiled_features.values())
        diffs[mode] = max((tiled_dist.mean - dist.mean).abs().max().item(),
                          (cfw.decode(z, tiled_features, 0.5, options) - reference).abs().max().item())
    diffs["bounded encode, untiled decode"] = (cfw.decode(z, tiled_features, 0.5) - reference).abs().max().item()
    print("CFW tiled, max abs diff to untiled: " + ", ".join(f"{mode} {diff:.2e}" for mode, diff in diffs.items()))
    assert max(diffs.values()) < 1e-3


VAE_MODES = [("untiled", BIG_BUDGET), ("exact", BIG_BUDGET), ("bounded", 1e-6)]


def overflowing(vae):
    """Scale `vae`'s (float16) mid-block convolutions so that their outputs pass float16's 65504 in the encoder
    and the decoder; the GroupNorms after them bring the values back, so in float32 the output stays finite."""
    for coder in (vae.encoder, vae.decoder):
        coder.mid_block.resnets[0].conv2.weight.data *= 1e5
    return vae


@pytest.mark.parametrize("mode, budget", VAE_MODES)
def test_a_float16_vae_that_overflows_is_redone_in_float32(backbone, mode, budget):
    """float16, the CUDA default, overflows where a VAE's activations pass 65504: that pass is redone with the
    VAE in float32 (one warning), then the VAE is float16 again for the next image."""
    vae = overflowing(copy.deepcopy(backbone.vae).half())
    in_float32 = copy.deepcopy(vae).float()  # the same float16-rounded weights
    options = TilingOptions(vae_tile_size=4, max_memory=budget)  # small: float16 convolutions are slow on CPUs
    image = (smooth((1, 3, 96, 64), 7, cells=6) * 0.5).clamp(-1, 1).half()
    latent = smooth((1, 4, 12, 8), 8, cells=4).half()
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(latent).sample).all()  # the overflow is real
        assert not torch.isfinite(vae.encode(image).latent_dist.parameters).all()
        with pytest.warns(UserWarning, match="float16 VAE encode overflowed"):
            encoded = tiling.vae_encode(vae, image, options, mode).parameters
        with pytest.warns(UserWarning, match="float16 VAE decode overflowed"):
            decoded = tiling.vae_decode(vae, latent, options, mode)
        expected_encoded = in_float32.encode(image.float()).latent_dist.parameters
        expected_decoded = in_float32.decode(latent.float()).sample
    assert encoded.dtype == decoded.dtype == torch.float16
    assert {p.dtype for p in vae.parameters()} == {torch.float16}
    differences = (encoded.float() - expected_encoded).abs().max().item(), \
        (decoded.float() - expected_decoded).abs().max().item()
    print(f"{mode}: redone in float32, max abs diff to float32 (float16 rounding): {differences}")
    assert max(differences) < 4e-3


def test_a_float16_vae_that_does_not_overflow_runs_once(backbone):
    vae = copy.deepcopy(backbone.vae).half()
    latent = smooth((1, 4, 12, 8), 8, cells=4).half()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(tiling.vae_decode(vae, latent), vae.decode(latent).sample)


@pytest.mark.parametrize("mode, tile, budget", [("untiled", 64, BIG_BUDGET), ("bounded", 4, 1e-6)])
def test_stablesr_cfw_overflow_is_redone_with_its_fusion_layers(cfw, mode, tile, budget):
    """A redone CFW decode upcasts the fusion layers with the VAE, and takes features from an encode that was
    itself redone in float32 (float32 maps into a float16 decoder)."""
    half = copy.deepcopy(cfw).half()
    overflowing(half.vae)
    in_float32 = copy.deepcopy(half).float()
    options = TilingOptions(vae_tile_size=tile, max_memory=budget)  # the fusion layers' two paths
    image = (smooth((1, 3, 64, 48), 7, cells=6) * 0.5).clamp(-1, 1).half()
    z = smooth((1, 4, 8, 6), 8, cells=4).half()
    assert tiling.vae_plan(options, half.vae, (8, 6), True, "cpu", torch.float16)[0] == mode
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, features = half.encode(image, options)
        decoded = half.decode(z, features, 0.5, options)
        _, expected_features = in_float32.encode(image.float())
        expected = in_float32.decode(z.float(), expected_features, 0.5)
    assert decoded.dtype == torch.float16 and {p.dtype for p in half.parameters()} == {torch.float16}
    difference = (decoded.float() - expected).abs().max().item()
    print(f"CFW {mode}: redone in float32, max abs diff to float32 {difference:.2e}")
    assert difference < 4e-3


def test_stablesr_upscales_through_the_bounded_vae_without_seams(cfw, base):
    import diffsr
    from diffsr.testing import make_tiny_weights

    weights = make_tiny_weights("stablesr", base, base.parent / "stablesr" / "stablesr_turbo.ckpt")
    upscaler = diffsr.load_upscaler("stablesr", base=base, weights=weights)
    lr = smooth((1, 3, 256, 256), 3, cells=8) * 0.6 + 0.2
    options = TilingOptions(tile_size=16, tile_overlap=8, vae_tile_size=16, max_memory=1e-6)
    assert tiling.vae_plan(options, upscaler.autoencoder.vae, (32, 32), True, "cpu", torch.float32)[0] == "bounded"
    with torch.no_grad():
        out = upscaler.restore(lr, torch.Generator().manual_seed(0), steps=2, tiling=options)
    assert out.shape[-2:] == (256, 256) and torch.isfinite(out).all()
    borders = tile_borders(32, 16, 8, unit=8)  # the denoiser's tiles (the VAE's bands are exact)
    ratio = seam_ratio(out[0] * 255, borders, borders)
    print(f"StableSR, bounded VAE: seam ratio {ratio:.3f}")
    assert ratio < 1.1


@pytest.mark.parametrize("max_memory", [BIG_BUDGET, 1e-6])  # exact, then bounded VAE modes
def test_vae_phases_report_every_block(upscaler, max_memory):
    """A long encode or decode shows movement: the tiled modes report each block of the network, with the
    phase's total known at its first unit."""
    vae = upscaler.backbone.vae
    steps = []
    image = (smooth((1, 3, 32, 40), 4)[0].permute(1, 2, 0).numpy() * 40 + 128).clip(0, 255).astype(np.uint8)
    upscaler(image, scale=4, callback=steps.append, tile_size=16, tile_overlap=8, vae_tile_size=8,
             max_memory=max_memory)
    levels, layers = len(vae.config.block_out_channels), vae.config.layers_per_block
    blocks = {"encode": 1 + levels * layers + (levels - 1) + 3 + 1,  # conv_in, resnets, downsamplers, mid, head
              "decode": 1 + 3 + levels * (layers + 1) + (levels - 1) + 1}  # conv_in, mid, resnets, upsamplers, head
    for phase in ("encode", "decode"):
        units = [(step.done, step.total) for step in steps if step.phase == phase]
        assert units == [(n, blocks[phase]) for n in range(1, blocks[phase] + 1)]


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_denoiser_passes_are_reported(upscaler, base):
    """The callback hears of every batch of denoiser tiles, with the total known from the first: one pass of
    4 tiles for OSEDiff, one per step for StableSR (the CLI's second progress bar shows these)."""
    from diffsr.testing import make_tiny_weights

    stablesr = diffsr.load_upscaler("stablesr", base=base,
                                    weights=make_tiny_weights("stablesr", base, base.parent / "sr" / "stablesr_turbo.ckpt"))
    image = np.full((32, 40, 3), 128, np.uint8)
    for model, knobs, passes in ((upscaler, {"tile_size": 16, "tile_overlap": 8}, 1), (stablesr, {"steps": 3}, 3)):
        steps = []
        model(image, scale=4, callback=steps.append, **knobs)
        denoise = [(step.done, step.total) for step in steps if step.phase == "denoise"]
        total = denoise[0][1]  # known at the first batch: tile batches per pass x passes
        assert total % passes == 0 and total > (1 if passes == 1 else passes - 1)  # OSEDiff's 16 px tiles: several
        assert denoise == [(n, total) for n in range(1, total + 1)]
        assert [step.phase for step in steps if step.phase != "denoise"] == ["encode", "decode"]
    model(image, scale=4)  # without a callback nothing is reported (and nothing fails)


# -- automatic choice and bad input ----------------------------------------------------------------------


def test_budget_picks_tiles(backbone):
    vae, unet = backbone.vae, backbone.unet
    roomy, tight = TilingOptions(max_memory=BIG_BUDGET), TilingOptions(max_memory=0.001)
    assert tiling.vae_plan(roomy, vae, (64, 64), True, "cpu", torch.float32) == ("untiled", tiling.DECODER_TILE)
    mode, tile = tiling.vae_plan(tight, vae, (64, 64), True, "cpu", torch.float32)
    assert mode == "bounded" and tile < 64
    assert roomy.denoiser_tile(96, unet, "cpu", torch.float32) == 96
    assert tight.denoiser_tile(96, unet, "cpu", torch.float32) < 96
    assert TilingOptions(tile_size=48).denoiser_tile(96, unet, "cpu", torch.float32) == 48


@pytest.mark.parametrize("knobs, message", [
    ({"tile_size": 30}, "tile_size 30 must be a positive multiple of 8"),
    ({"tile_size": 32, "tile_overlap": 32}, "tile_size 32 must be larger than tile_overlap 32"),
    ({"tile_size": 16, "tile_overlap": 32}, "must be larger than tile_overlap"),
    ({"vae_tile_size": 100}, "vae_tile_size 100 must be a positive multiple of 8"),
    ({"tile_batch": 0}, "tile_batch 0"),
    ({"max_memory": -1.0}, "max_memory -1.0"),
])
def test_bad_tiling_knobs_are_rejected(upscaler, knobs, message):
    with pytest.raises(UsageError, match=message):
        upscaler(np.zeros((16, 16, 3), np.uint8), scale=4, **knobs)


def test_cli_rejects_bad_tile_size_before_loading(tmp_path, capsys):
    """A real image in the folder and weights that do not exist: only the tile size can stop it, before loading."""
    from PIL import Image

    from diffsr.cli import EXIT_USAGE, main

    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "x.png")
    code = main(["upscale", str(tmp_path), "-o", str(tmp_path / "out"), "--tile-size", "20", "--base", str(tmp_path),
                 "--weights", str(tmp_path / "missing.pkl")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--tile-size 20 must be a positive multiple of 8" in err
    assert "missing.pkl" not in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, weights_name, knobs", [
    ("s3diff", "s3diff.pkl", {"degradation": (0.3, 0.3)}),
    ("ccsr", "ccsr_v2", {}),
    ("stablesr", "stablesr_turbo.ckpt", {"steps": 2}),
])
def test_every_method_denoises_large_latents_through_the_tiler(base, tmp_path, method, weights_name, knobs):
    """A 256 px input (32x32 latent) with 16-px tiles: the UNet sees 16x16 tiles, the result has no seams."""
    import diffsr
    from diffsr.testing import make_tiny_weights
    from diffsr.tiling import TilingOptions

    upscaler = diffsr.load_upscaler(method, base=base, weights=make_tiny_weights(method, base, tmp_path / weights_name))
    unet = upscaler.backbone.unet
    shapes = []
    handle = unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    lr = smooth((1, 3, 256, 256), 3, cells=8) * 0.6 + 0.2
    try:
        with torch.no_grad():
            out = upscaler.restore(lr, torch.Generator().manual_seed(0), **knobs,
                                   tiling=TilingOptions(tile_size=16, tile_overlap=8, max_memory=BIG_BUDGET))
    finally:
        handle.remove()
    assert out.shape[-2:] == (256, 256) and torch.isfinite(out).all()
    assert shapes and set(shapes) == {(16, 16)}
    borders = tile_borders(32, 16, 8, unit=8)
    assert seam_ratio(out[0] * 255, borders, borders) < 1.1


FRAGMENTING_HEAP = """
import sys
from pathlib import Path
import torch
from diffsr.tiling import return_freed_memory, trim_heap

def rss_mb():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024

torch.ones(30 << 18)  # a freed 30 MB block, as model loading frees: glibc's threshold rises to 30 MB
if sys.argv[1] == "apply":
    assert return_freed_memory()
blocks = [torch.ones(2 << 18) for _ in range(200)]  # 2 MB each
before = rss_mb()
del blocks[::2]  # every other block: the freed ones sit between live ones
if sys.argv[1] == "trim":
    assert trim_heap()
print(before - rss_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting")
def test_cpu_upscaling_returns_freed_feature_maps_to_the_system():
    """Freed 2 MB blocks between live ones stay resident under glibc's raised threshold (the control) and go
    back to the system once `return_freed_memory` has run (what the command line does first)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}

    def returned_mb(mode):
        done = subprocess.run([sys.executable, "-c", FRAGMENTING_HEAP, mode], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.split()[-1])

    assert returned_mb("default") < 50
    assert returned_mb("apply") > 150
    # trim_heap, once after the blocks were freed (load_upscaler's call), returns them without the setting
    assert returned_mb("trim") > 150


def test_load_upscaler_returns_its_freed_loading_buffers(base, monkeypatch):
    """load_upscaler trims the heap once, after the method is built (its read and conversion buffers are freed by
    then); the trim's effect is the test above."""
    from diffsr.testing import make_tiny_weights

    weights = make_tiny_weights("osediff", base, base.parent / "osediff.pkl")
    calls = []
    monkeypatch.setattr("diffsr.tiling.trim_heap", lambda: calls.append(1))
    diffsr.load_upscaler("osediff", base=base, weights=weights)
    assert calls == [1]


def test_the_allocator_setting_is_the_command_lines_not_a_library_calls(upscaler, monkeypatch, capsys):
    """A process-wide setting: `diffsr` applies it at its entry; an upscale through the library leaves the
    process's allocator alone."""
    from diffsr.cli import main

    calls = []
    monkeypatch.setattr("diffsr.tiling.return_freed_memory", lambda: calls.append(1))
    upscaler(np.zeros((16, 16, 3), np.uint8), scale=2)
    assert not calls
    assert main(["methods"]) == 0 and calls == [1]
