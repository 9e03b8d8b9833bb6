"""torch.compile behind an option (issue #22): load_upscaler(compile=MODE), `diffsr upscale --compile MODE`.

The compiled networks must give the eager result within the float32 parity tolerance (max abs 1e-4 on images in
[0, 1], the parity tests' own); the CUDA modes (float16, reduce-overhead's CUDA graphs) are in tests/test_cuda.py.
"""

import pytest
import torch

import diffsr
from conftest import smooth_image
from diffsr.nets.winograd import WinogradConv2d


def compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None  # what nn.Module.compile sets


def lr_image(size=48):
    return torch.from_numpy(smooth_image(size, size, seed=2)).permute(2, 0, 1)[None].float() / 255


def test_a_bad_compile_mode_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(diffsr.UsageError, match="unknown compile mode 'fast' .*reduce-overhead"):
        diffsr.load_upscaler("osediff", base=tmp_path / "missing", weights=tmp_path / "missing.pkl", compile="fast")


def test_the_cli_passes_the_compile_mode_to_the_loader_and_refuses_others(capsys):
    from diffsr.cli import _load_options, build_parser, main

    parser = build_parser()
    for flags, given in (([], None), (["--compile", "reduce-overhead"], "reduce-overhead")):
        args = parser.parse_args(["upscale", "a.png", "-o", "out", *flags])
        assert _load_options(args).get("compile") == given
    with pytest.raises(SystemExit):
        main(["upscale", "a.png", "-o", "out", "--compile", "fast"])
    assert "--compile: invalid choice: 'fast'" in capsys.readouterr().err


def test_compile_wraps_the_unet_and_the_vae_coders_not_the_text_encoder(tiny_base, s3diff_weights):
    upscaler = diffsr.load_upscaler("s3diff", base=tiny_base, weights=s3diff_weights, compile="default")
    backbone = upscaler.backbone
    assert compiled(backbone.unet) and compiled(backbone.vae.encoder) and compiled(backbone.vae.decoder)
    own = [net for net in upscaler.networks() if net not in (backbone.unet, backbone.vae, backbone.text_encoder)]
    assert own and all(compiled(net) for net in own)  # S3Diff's DE-Net
    assert not compiled(backbone.text_encoder) and not compiled(backbone.vae)
    # the compiler cannot trace NNPACK's convolution: no Winograd when compiling
    assert not any(type(m) is WinogradConv2d for net in upscaler.networks() for m in net.modules())
    eager = diffsr.load_upscaler("s3diff", base=tiny_base, weights=s3diff_weights)
    assert not any(compiled(m) for net in eager.networks() for m in net.modules())


@pytest.mark.slow
def test_compiled_osediff_equals_eager_within_float32_parity(tiny_base, osediff_weights):
    """The whole one-step flow compiled (inductor on the CPU: about a minute of compilation on 2 cores)."""
    eager = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger=None, winograd=False)
    fast = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger=None, compile="default")
    with torch.no_grad():
        expected = eager.restore(lr_image(), torch.Generator().manual_seed(0))
        first = fast.restore(lr_image(), torch.Generator().manual_seed(0))
        again = fast.restore(lr_image(), torch.Generator().manual_seed(0))
    difference = (first - expected).abs().max().item()
    print(f"osediff compiled vs eager max abs {difference:.2e}")
    assert difference < 1e-4
    assert torch.equal(first, again)
