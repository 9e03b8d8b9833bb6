"""The LDM autoencoder loss (diffsr.training.autoencoder_loss) on hand-made cases: the PatchGAN's shape
and names, the hinge loss, the adversarial weight (adaptive from last-layer gradients, or fixed), the
discriminator start, and which parameters each phase's loss reaches."""

from pathlib import Path

import pytest
import torch
from torch import nn

from diffsr.training.autoencoder_loss import AutoencoderLoss, NLayerDiscriminator, hinge_discriminator_loss
from metric_helpers import metric_weights  # noqa: F401  (fixture)


def test_discriminator_layout_and_patch_output():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    convs = [m for m in disc.main if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.main) == 3
    # taming's module names, so a release checkpoint's loss.discriminator.* tensors load unchanged
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight",
            "main.11.bias"} <= set(disc.state_dict())
    assert "main.2.bias" not in disc.state_dict()  # no bias before BatchNorm
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002  # weights_init: N(0, 0.02)
    assert disc(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_hinge_loss_by_hand():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.75)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5)


class TinyGenerator(nn.Module):
    """A 'decoder' whose last layer is a conv, as the autoencoder's conv_out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.conv_out(torch.tanh(self.body(x)))


def make_case(seed=0, **options):
    torch.manual_seed(seed)
    loss = AutoencoderLoss(perceptual_weight=0.0, **options)
    generator = TinyGenerator()
    source, target = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    return loss, generator, source, target


def test_adaptive_weight_is_the_gradient_norm_ratio():
    loss, generator, source, target = make_case(disc_start=0, disc_weight=0.5, adaptive_weight=True)
    reconstruction = generator(source)
    last = generator.conv_out.weight
    total, logs = loss.generator_loss(target, reconstruction, step=5, last_layer=last)
    rec = (target - reconstruction).abs().mean() / 2  # the release divides the mean by the batch size again
    gan = -loss.discriminator(reconstruction).mean()
    rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, last, retain_graph=True)[0]
    expected = (rec_grad.norm() / (gan_grad.norm() + 1e-4)).item() * 0.5
    assert logs["d_weight"] == pytest.approx(expected, rel=1e-5)
    assert logs["loss_rec"] == pytest.approx(rec.item(), rel=1e-6)
    assert total.item() == pytest.approx(rec.item() + expected * gan.item(), rel=1e-5)
    with pytest.raises(ValueError, match="last layer"):
        loss.generator_loss(target, generator(source), step=5, last_layer=None)
    with torch.no_grad():  # evaluation: no graph, so the fixed weight (the release's fallback)
        assert loss.generator_loss(target, generator(source), step=5, last_layer=last)[1]["d_weight"] == 0.5


def test_fixed_weight_and_gradients_reach_only_the_generator():
    loss, generator, source, target = make_case(disc_start=0, disc_weight=0.025, adaptive_weight=False)
    reconstruction = generator(source)
    total, logs = loss.generator_loss(target, reconstruction, step=0, last_layer=generator.conv_out.weight)
    assert logs["d_weight"] == pytest.approx(0.025) and logs["disc_factor"] == 1.0
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(p.requires_grad for p in loss.discriminator.parameters())  # switched back on afterwards
    # d(total)/d(reconstruction) = d(rec)/d(rec) + 0.025 * d(gan)/d(rec)
    fake = reconstruction.detach().requires_grad_()
    total_grad = torch.autograd.grad(loss.generator_loss(target, fake, step=0)[0], fake)[0]
    rec_grad = torch.autograd.grad(loss.reconstruction_loss(target, fake), fake)[0]
    gan_grad = torch.autograd.grad(-loss.discriminator(fake).mean(), fake)[0]
    assert torch.allclose(total_grad, rec_grad + 0.025 * gan_grad, atol=1e-7)


def test_discriminator_phase_and_start_step():
    loss, generator, source, target = make_case(disc_start=10)
    reconstruction = generator(source)
    # before the start: the adversarial terms are multiplied by 0
    before, logs = loss.generator_loss(target, reconstruction, step=9)
    assert logs["disc_factor"] == 0.0 and before.item() == pytest.approx(logs["loss_rec"])
    d_loss, _ = loss.discriminator_loss(target, reconstruction, step=9)
    assert d_loss.item() == 0.0
    # from the start on: the hinge loss, reaching the discriminator only
    d_loss, logs = loss.discriminator_loss(target, reconstruction, step=10)
    with torch.no_grad():
        expected = hinge_discriminator_loss(loss.discriminator(target), loss.discriminator(reconstruction))
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-5) and d_loss.item() > 0
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert all(p.grad is None for p in generator.parameters())


def test_perceptual_term(metric_weights):  # noqa: F811
    from diffsr.training.losses import PerceptualLoss

    torch.manual_seed(0)
    loss = AutoencoderLoss(metric_weights, perceptual_weight=1.0)
    target, reconstruction = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    lpips = PerceptualLoss(metric_weights)(reconstruction, target)
    expected = ((target - reconstruction).abs().mean() + lpips) / 2
    assert loss.reconstruction_loss(target, reconstruction).item() == pytest.approx(expected.item(), rel=1e-5)


FIXTURE = Path(__file__).parent / "fixtures" / "autoencoder_loss" / "reference.pt"


def test_matches_the_release_loss():
    """Against latent-diffusion's LPIPSWithDiscriminator + taming's PatchGAN (tests/fixtures/autoencoder_loss/
    make_reference.py), LPIPS off: the same initial discriminator from the same seed, then the generator loss
    with the adaptive weight, with the fixed one (the release's fallback when the last layer is frozen, StableSR's
    case), and before the start step; the discriminator's hinge loss; the gradient reaching the reconstruction."""
    import hashlib

    reference = torch.load(FIXTURE)
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator()
    digest = hashlib.sha256()
    for name, tensor in sorted(discriminator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == reference["discriminator_digest"]

    torch.manual_seed(1)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    source, target = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    worst = 0.0
    for case, step, adaptive in (("adaptive", 3, True), ("fixed", 3, False), ("before_start", 1, True)):
        loss = AutoencoderLoss(perceptual_weight=0.0, disc_start=2, disc_weight=0.5, adaptive_weight=adaptive)
        loss.discriminator.load_state_dict(discriminator.state_dict())
        expected = reference[case]
        reconstruction = generator(source)
        total, logs = loss.generator_loss(target, reconstruction, step, last_layer=generator.weight)
        grad = torch.autograd.grad(total, reconstruction)[0]
        d_loss, _ = loss.discriminator_loss(target, reconstruction, step)
        for ours, theirs in (("loss_rec", "rec_loss"), ("loss_gan", "g_loss")):
            assert logs[ours] == pytest.approx(expected[theirs], rel=1e-5, abs=1e-7)
        if case != "before_start":  # (the release computes a weight there too, then multiplies it by 0)
            assert logs["d_weight"] == pytest.approx(expected["d_weight"], rel=1e-4)
        # total = rec + w * gan cancels (0.275 - 0.5 * 0.424 in the fixed case): its tolerance is the components'
        # rel 1e-5 carried through the sum, not 1e-5 of the small difference (CPU kernels differ by ~2e-6 in gan).
        scale = abs(expected["rec_loss"]) + abs(float(logs["d_weight"]) * float(logs["disc_factor"]) * expected["g_loss"])
        assert total.item() == pytest.approx(expected["loss"], rel=1e-5, abs=1e-5 * float(scale))
        assert d_loss.item() == pytest.approx(expected["disc_loss"], rel=1e-5, abs=1e-7)
        worst = max(worst, (grad - expected["grad"]).abs().max().item())
    print(f"autoencoder loss vs the release: gradient max abs diff {worst:.2e}")
    assert worst < 1e-6
