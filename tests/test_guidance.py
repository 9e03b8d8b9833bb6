"""The one guidance function and the one-step helper (diffsr.samplers), against the formulas written out."""

import torch

from diffsr.samplers import guide, one_step, x0_from_eps


def network(x, texts):
    """A stand-in whose output depends on each row's text, so branch order mistakes show."""
    return x * texts.mean(dim=(1, 2)).view(-1, 1, 1, 1) + texts[:, :1, :1].unsqueeze(-1)


def test_guide_is_negative_plus_scale_times_difference_in_every_form():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=generator)
    text, negative = torch.randn(1, 5, 6, generator=generator), torch.randn(1, 5, 6, generator=generator)
    cond, uncond = network(x, text.expand(2, -1, -1)), network(x, negative.expand(2, -1, -1))
    expected = uncond + 3.5 * (cond - uncond)
    calls = []

    def counted(x_, texts):
        calls.append(x_.shape[0])
        return network(x_, texts)

    for batched in (True, False):
        for negative_first in (True, False):
            calls.clear()
            out = guide(counted, x, text, negative, 3.5, batched=batched, negative_first=negative_first)
            torch.testing.assert_close(out, expected)
            assert calls == ([4] if batched else [2, 2])


def test_guide_off_rules():
    x = torch.ones(1, 4, 2, 2)
    text, negative = torch.full((1, 5, 6), 2.0), torch.zeros(1, 5, 6)
    plain = network(x, text)
    torch.testing.assert_close(guide(network, x, text, negative, 1.0), plain)  # default rule: scale 1 is off
    torch.testing.assert_close(guide(network, x, text, None, 7.0), plain)  # no negative prompt: off
    below = guide(network, x, text, negative, 0.5, off=lambda s: s <= 1)  # a release whose rule is "<= 1"
    torch.testing.assert_close(below, plain)
    assert not torch.allclose(guide(network, x, text, negative, 0.5), plain)


def test_one_step_is_encode_eps_x0_decode():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    weight = torch.randn(4, 3, 1, 1, generator=generator)
    encode = lambda im: torch.nn.functional.conv2d(im, weight)  # noqa: E731
    eps_at = lambda z: 0.3 * z  # noqa: E731
    decode = lambda z: torch.tanh(z[:, :3]) * 2  # noqa: E731  (values beyond [-1, 1]: the helper clamps)
    x0, decoded = one_step(image, encode, eps_at, decode, 0.04, 0.18)
    latent = encode(image) * 0.18
    torch.testing.assert_close(x0, x0_from_eps(latent, 0.3 * latent, 0.04))
    torch.testing.assert_close(decoded, decode(x0 / 0.18).clamp(-1, 1))
    assert decoded.abs().max() <= 1
