import pytest
import torch

from diffsr.color import adain, color_fix, wavelet


def test_adain_gives_result_the_source_statistics():
    torch.manual_seed(0)
    source = torch.rand(1, 3, 32, 40) * 0.5 + 0.25
    result = torch.rand(1, 3, 32, 40) * 0.2
    fixed = adain(result, source)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), source.mean(dim=(2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(fixed.std(dim=(2, 3)), source.std(dim=(2, 3)), atol=1e-3, rtol=0)


def test_wavelet_keeps_result_detail_and_source_colour():
    torch.manual_seed(0)
    detail = torch.rand(1, 3, 64, 64) * 0.1
    result = detail + 0.2
    source = torch.full((1, 3, 64, 64), 0.7)
    fixed = wavelet(result, source)
    # A constant shift lives entirely in the low band: the source's colour (0.7) replaces the result's (0.25),
    # in every channel; the high band (the detail) has no mean of its own.
    assert result.mean().item() < 0.3
    assert (fixed.mean(dim=(2, 3)) - source.mean(dim=(2, 3))).abs().max().item() < 0.005
    torch.testing.assert_close(fixed - fixed.mean(), result - result.mean(), atol=0.05, rtol=0)
    # Identity when both are the same image.
    torch.testing.assert_close(wavelet(result, result), result.clamp(0, 1), atol=1e-5, rtol=0)


def test_unknown_fix_is_rejected():
    with pytest.raises(ValueError, match="unknown color fix 'sepia'"):
        color_fix(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), "sepia")


def test_wavelet_in_bands_equals_the_whole_image_computation(monkeypatch):
    """Bands of 8 rows with 31 rows of context give what one whole-image pass gives (to float rounding)."""
    torch.manual_seed(1)
    result, source = torch.rand(1, 3, 100, 48), torch.rand(1, 3, 100, 48)
    whole = wavelet(result, source, rows=1000)
    banded = wavelet(result, source, rows=8)
    assert (whole - banded).abs().max().item() < 1e-6
    # And with too little context a band would differ: the reach is needed.
    from diffsr import color

    monkeypatch.setattr(color, "WAVELET_REACH", 15)
    assert (wavelet(result, source, rows=8) - whole).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_colour_fix_before_the_clamp_sees_the_values_outside(method):
    """clamp_first=False (CCSR v1's release order) fixes the unclamped image, in place and, for the wavelet fix,
    in bands (300 rows: two bands) that give what one whole-image pass over the unclamped values gives."""
    from diffsr.methods.base import color_fix_and_clamp

    torch.manual_seed(2)
    result, source = torch.rand(1, 3, 300, 24) * 2 - 0.5, torch.rand(1, 3, 300, 24)
    if method == "adain":
        mean, std = result.mean(dim=(2, 3), keepdim=True), (result.var(dim=(2, 3), keepdim=True) + 1e-5).sqrt()
        s_mean, s_std = source.mean(dim=(2, 3), keepdim=True), (source.var(dim=(2, 3), keepdim=True) + 1e-5).sqrt()
        expected = ((result - mean) / std * s_std + s_mean).clamp(0, 1)
    else:
        expected = wavelet(result, source, rows=1000)
    given = result.clone()
    later = color_fix_and_clamp(given, source, method, clamp_first=False)
    assert torch.equal(given, result)  # nothing clamped before the fix
    assert (later - expected).abs().max().item() < 1e-5
    assert 0 <= later.min() and later.max() <= 1
    first = color_fix_and_clamp(result.clone(), source, method)
    assert (first - later).abs().max().item() > 0.05  # the order matters on these values
