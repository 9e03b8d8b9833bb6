"""The CPU float32 fast path: 3x3 convolutions by NNPACK's Winograd transform (diffsr.nets.winograd).

Winograd gives direct convolution's result up to float32 rounding. The bound used here for whole methods,
max abs 1e-4 on images in [0, 1], is the float32 parity tests' own (tests/test_*.py parity against the
releases, which run with Winograd on since it is the CPU default), far inside the half-precision tolerance of
tests/test_cuda.py (mean abs 0.02 for float16).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffsr
from conftest import smooth_image
from diffsr.nets import winograd
from diffsr.nets.winograd import WinogradConv2d, use_winograd

pytestmark = pytest.mark.skipif(not winograd.available(), reason="this torch has no NNPACK for this CPU")

# Per method: the weights fixture and knobs that keep the tiny runs short.
METHODS = {
    "osediff": ("osediff_weights", {}),
    "s3diff": ("s3diff_weights", {"degradation": (0.3, 0.2)}),
    "stablesr": ("stablesr_weights", {"steps": 4}),
    "ccsr": ("ccsr_v2_weights", {"steps": 4}),
}


def convolution(in_channels, out_channels, bias=True, padding=1):
    torch.manual_seed(0)
    return nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=bias)


@pytest.mark.parametrize("shape, out_channels, bias, padding, layout", [
    ((1, 4, 32, 32), 4, True, 1, "contiguous"),
    ((1, 3, 37, 50), 8, True, 1, "contiguous"),
    ((2, 32, 40, 33), 16, False, 1, "channels_last"),
    ((3, 8, 64, 64), 8, True, 0, "transposed"),
    ((1, 64, 40, 32), 128, True, 1, "contiguous"),
])
def test_winograd_convolution_equals_direct(shape, out_channels, bias, padding, layout):
    conv = convolution(shape[1], out_channels, bias, padding)
    x = torch.randn(shape)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "transposed": x.transpose(2, 3).contiguous().transpose(2, 3)}[layout]
    with torch.no_grad():
        direct = conv(x)
        assert use_winograd([conv]) == 1 and type(conv) is WinogradConv2d
        fast = conv(x)
    assert fast.shape == direct.shape
    # Winograd's transforms cost a few bits: about 1e-5 of the output's range, not float32's 1e-7
    assert (fast - direct).abs().max().item() <= 5e-5 * direct.abs().max().item() + 1e-6
    assert not torch.equal(fast, direct)  # it did run another algorithm


@pytest.mark.parametrize("shape", [(1, 4, 31, 33), (2, 16, 8, 8), (1, 3, 1, 1)])
def test_maps_smaller_than_min_area_run_direct_convolution(shape):
    """Where NNPACK measured slower (its kernel transform is redone every call), direct convolution runs."""
    conv = convolution(shape[1], 8)
    x = torch.randn(shape)
    with torch.no_grad():
        direct = conv(x)
        use_winograd([conv])
        assert torch.equal(conv(x), direct)
    assert shape[-2] * shape[-1] < winograd.MIN_AREA


def test_winograd_leaves_gradients_and_other_dtypes_to_direct_convolution():
    conv = convolution(8, 8)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    direct = conv(x)
    use_winograd([conv])
    fast = conv(x)  # gradient enabled: direct convolution, bit for bit, and differentiable
    assert torch.equal(fast, direct) and fast.requires_grad
    fast.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        double = conv.double()(x.double())
        assert double.dtype == torch.float64
        assert torch.equal(double, F.conv2d(x.double(), conv.weight, conv.bias, padding=1))


def test_only_plain_3x3_stride_1_convolutions_switch_and_they_switch_back():
    network = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 1),
                            nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                            nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    assert use_winograd([network]) == 1
    assert [type(m) for m in network] == [WinogradConv2d] + [nn.Conv2d] * 6
    assert use_winograd([network], enabled=False) == 1 and type(network[0]) is nn.Conv2d
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items())


def lr_image(size=48):
    return torch.from_numpy(smooth_image(size, size, seed=2)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_winograd_on_cpu_float32_within_float32_parity(name, tiny_base, request):
    """load_upscaler switches the convolutions on the CPU in float32 (the default); the restored image is the
    direct convolutions' within the float32 parity tolerance."""
    fixture, knobs = METHODS[name]
    weights = request.getfixturevalue(fixture)
    upscaler = diffsr.load_upscaler(name, base=tiny_base, weights=weights)
    switched = {m for network in upscaler.networks() for m in network.modules() if type(m) is WinogradConv2d}
    assert len(switched) > 10  # UNet, VAE and the method's own networks
    with torch.no_grad():
        fast = upscaler.restore(lr_image(), torch.Generator().manual_seed(0), **knobs)
        assert use_winograd(upscaler.networks(), enabled=False) == len(switched)
        direct = upscaler.restore(lr_image(), torch.Generator().manual_seed(0), **knobs)
    difference = (fast - direct).abs().max().item()
    print(f"{name}: Winograd vs direct max abs {difference:.2e}")
    assert 0 < difference < 1e-4


def test_winograd_off_or_not_float32_keeps_direct_convolutions(tiny_base, osediff_weights):
    for options in ({"winograd": False}, {"dtype": "bfloat16"}):
        upscaler = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger=None, **options)
        assert not any(type(m) is WinogradConv2d for network in upscaler.networks() for m in network.modules())
    with pytest.raises(diffsr.ArgumentTypeError, match="winograd must be True or False"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, winograd="yes")


def test_the_memory_budget_counts_nnpack_workspace(tiny_base, osediff_weights):
    """NNPACK's workspace is about twice the input of the convolution it runs: 1024 px full-size decode, 4.0 GB
    working memory direct against 6.0 GB by Winograd (3.7 and 5.6 maps of the widest stage); the VAE tiles
    are planned with two maps more."""
    from diffsr.tiling.budget import DECODER, vae_bytes_per_latent_px

    vae = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger=None).backbone.vae
    fast = vae_bytes_per_latent_px(vae, True, torch.float32)
    use_winograd([vae], enabled=False)
    direct = vae_bytes_per_latent_px(vae, True, torch.float32)
    assert fast / direct == pytest.approx((DECODER.live_maps + DECODER.winograd_maps) / DECODER.live_maps)
    use_winograd([vae])
    assert vae_bytes_per_latent_px(vae, True, torch.bfloat16) < fast  # NNPACK runs float32 only
