"""StableSR trainers on the tiny base: the losses fall, frozen parts stay unchanged, gradients reach
exactly the trained pieces, and save_release writes files that diffsr.load_upscaler('stablesr') loads
with the trained modules' outputs."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import diffsr
from diffsr.training.base import state_digest
from diffsr.training.stablesr import StableSRStage1, StableSRStage2
from conftest import parity_fixture
from metric_helpers import metric_weights  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def release_weights(tiny_base):
    """Stage-1 release-format weights (with a CFW file beside them), as the authors' files."""
    from diffsr.testing import make_tiny_weights

    folder = tiny_base.parent / "stablesr-release"
    folder.mkdir(exist_ok=True)
    return make_tiny_weights("stablesr", tiny_base, folder / "stablesr_000117.ckpt")


def crops(count=4, seed=0):
    """HR crops (64 px) and their 4x area-downscaled LR (16 px)."""
    generator = torch.Generator().manual_seed(seed)
    hr = torch.rand(count, 3, 8, 8, generator=generator)
    hr = F.interpolate(hr, size=(64, 64), mode="bilinear", align_corners=False)  # smooth, image-like
    return [{"hr": hr[i:i + 2], "lr": F.interpolate(hr[i:i + 2], scale_factor=0.25, mode="area")}
            for i in range(0, count, 2)]


def evaluate(trainer, batches, phase="generator", key=None, seeds=(0, 1)):
    """Mean loss (or log `key`) over the batches at fixed seeds, without training."""
    values = []
    with torch.no_grad():
        for seed in seeds:
            for batch in batches:
                torch.manual_seed(seed)
                loss, logs = trainer(dict(batch), phase)
                values.append(logs[key] if key else loss.item())
    return sum(values) / len(values)


def digests(trainer):
    return {name: state_digest(module) for name, module in trainer.frozen_modules().items()}


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_stage1_trains_encoder_and_sft_only(tiny_base, one_thread):
    torch.manual_seed(0)
    trainer = StableSRStage1(tiny_base, encoder_channels=32)
    params = trainer.parameter_groups()["generator"]
    names = {id(p): n for n, p in trainer.named_parameters()}
    assert all(".sft." in names[id(p)] or names[id(p)].startswith("encoder.") for p in params)
    assert any(names[id(p)].startswith("encoder.") for p in params) and any(".sft." in names[id(p)] for p in params)
    # the frozen UNet leaves hold every UNet tensor but the SFT ones
    frozen = trainer.frozen_modules()
    frozen_unet = sum(p.numel() for n, m in frozen.items() if n.startswith("unet") for p in m.parameters(recurse=False))
    unet = trainer.unet.unet
    assert frozen_unet == sum(p.numel() for n, p in unet.named_parameters() if ".sft." not in n) > 0

    batches = crops()
    before_frozen = digests(trainer)
    before = evaluate(trainer, batches)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for step in range(24):
        torch.manual_seed(step % 2)
        loss, _ = trainer(dict(batches[step % 2]), "generator")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate(trainer, batches)
    print(f"stage 1 eps loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    assert digests(trainer) == before_frozen


def test_stage1_gradients_and_checkpointing(tiny_base, one_thread):
    torch.manual_seed(0)
    trainer = StableSRStage1(tiny_base, encoder_channels=32)
    batch = crops(2)[0]

    def gradients():
        trainer.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss, _ = trainer(dict(batch), "generator")
        loss.backward()
        return {n: p.grad.clone() for n, p in trainer.named_parameters() if p.grad is not None}

    plain = gradients()
    trained = {n for n, p in trainer.named_parameters() if p.requires_grad}
    assert set(plain) == trained  # nothing frozen takes a gradient
    sft = [n for n in plain if ".sft." in n]
    assert sft and all(plain[n].abs().sum() > 0 for n in sft if "mlp_" in n)
    # The release zero-initialises each encoder ResBlock's last conv: it learns first, the rest through it
    # and the skip paths.
    assert all(plain[n].abs().sum() > 0 for n in plain if n.startswith("encoder.") and n.endswith("conv2.weight"))
    assert plain["encoder.conv_in.weight"].abs().sum() > 0
    # Checkpointing recomputes the UNet (and its SFT hooks) in the backward pass: same gradients.
    trainer.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert set(checkpointed) == set(plain)
    assert max((checkpointed[n] - plain[n]).abs().max().item() for n in plain) < 1e-6


def test_stage1_save_release_loads_with_the_trained_outputs(tiny_base, tmp_path, one_thread):
    torch.manual_seed(0)
    trainer = StableSRStage1(tiny_base, encoder_channels=32)
    with torch.no_grad():  # move off the initial values so that loading the wrong tensors would show
        for p in trainer.parameter_groups()["generator"]:
            p.add_(torch.randn_like(p) * 0.01)
    files = trainer.save_release(tmp_path)
    assert [f.name for f in files] == ["stablesr_000117.ckpt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CFW file: stage 1 has none
        # the trainer's upscaler runs direct convolution: compare the weights' round trip on the same algorithm
    loaded = diffsr.load_upscaler("stablesr", base=tiny_base, weights=files[0], winograd=False)
    ours = trainer.upscaler()
    torch.manual_seed(1)
    latent, condition = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([400])
    with torch.no_grad():
        expected = ours.network(latent, condition, t, trainer.text)
        got = loaded.network(latent, condition, t, trainer.text)
    print(f"stage 1 release round trip max abs diff {(got - expected).abs().max().item():.2e}")
    assert (got - expected).abs().max().item() < 1e-5

    # and fine-tuning starts from those weights
    again = StableSRStage1(tiny_base, weights=files[0])
    with torch.no_grad():
        assert (again.upscaler().network(latent, condition, t, trainer.text) - expected).abs().max().item() < 1e-5


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_stage2_trains_fusion_layers_on_stage1_latents(tiny_base, release_weights, metric_weights, one_thread):  # noqa: F811
    torch.manual_seed(0)
    trainer = StableSRStage2(tiny_base, release_weights, latent_steps=1, lpips_weights=metric_weights, disc_start=6)
    groups = trainer.parameter_groups()
    assert set(map(id, groups["generator"])) == set(map(id, trainer.autoencoder.fusion.parameters()))
    assert set(map(id, groups["discriminator"])) == set(map(id, trainer.loss.discriminator.parameters()))
    batches = crops(2)
    before_frozen = digests(trainer)
    before = evaluate(trainer, batches, key="loss_rec", seeds=(0,))
    optimizers = {name: torch.optim.Adam(params, lr=2e-3, betas=(0.5, 0.9)) for name, params in groups.items()}
    for step in range(8):
        trainer.global_step = step
        torch.manual_seed(0)
        batch = dict(batches[0])
        for phase, name in trainer.phases:
            loss, logs = trainer(batch, phase)
            trainer.zero_grad(set_to_none=True)
            loss.backward()
            if phase == "generator":
                # fixed adversarial weight, on from disc_start
                assert logs["d_weight"] == (pytest.approx(0.025) if step >= 6 else 0.0)
                assert all(p.grad is None for p in trainer.loss.discriminator.parameters())
            else:
                assert all(p.grad is None for p in trainer.autoencoder.fusion.parameters())
                assert (loss.item() > 0) == (step >= 6)
            optimizers[name].step()
    trainer.global_step = 0
    after = evaluate(trainer, batches, key="loss_rec", seeds=(0,))
    print(f"stage 2 reconstruction loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    assert digests(trainer) == before_frozen


def test_stage2_save_release_loads_with_the_trained_outputs(tiny_base, release_weights, tmp_path, one_thread):
    torch.manual_seed(0)
    trainer = StableSRStage2(tiny_base, release_weights, latent_steps=1, perceptual_weight=0.0)
    with torch.no_grad():
        for p in trainer.autoencoder.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    files = trainer.save_release(tmp_path)
    assert [f.name for f in files] == ["stablesr_000117.ckpt", "vqgan_cfw_00011.ckpt"]
    cfw = torch.load(files[1])["state_dict"]
    assert any(k.startswith("decoder.fusion_layer_1.") for k in cfw)
    assert "loss.discriminator.main.0.weight" in cfw
    # the trainer's upscaler runs direct convolution: compare the weights' round trip on the same algorithm
    loaded = diffsr.load_upscaler("stablesr", base=tiny_base, weights=files[0], winograd=False)
    ours = trainer.upscaler()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist, features = ours.autoencoder.encode(image)
        z = dist.mean
        expected = ours.autoencoder.decode(z, features, 0.7)
        got = loaded.autoencoder.decode(z, loaded.autoencoder.encode(image)[1], 0.7)
    print(f"stage 2 release round trip max abs diff {(got - expected).abs().max().item():.2e}")
    assert (got - expected).abs().max().item() < 1e-5
    # continuing from the saved CFW file starts from the saved fusion layers
    again = StableSRStage2(tiny_base, release_weights, fusion_weights=files[1], perceptual_weight=0.0)
    assert state_digest(again.autoencoder.fusion) == state_digest(trainer.autoencoder.fusion)


# -- through the shared loop (diffsr.training.loop) -------------------------------------------------------

def loop_config(folder, base, stage=1, weights=None, steps=4, **sections):
    from training_helpers import pair_folders, tiny_config

    lr_dir, hr_dir = pair_folders(folder.parent / "pairs")
    method_args = {"encoder_channels": 32} if stage == 1 else {"latent_steps": 1, "perceptual_weight": 0.0,
                                                                "disc_start": 2}
    optimizers = {"generator": {"lr": 1e-3}} if stage == 1 else {
        "generator": {"lr": 1e-3, "betas": [0.5, 0.9], "weight_decay": 0.0},
        "discriminator": {"lr": 1e-3, "betas": [0.5, 0.9], "weight_decay": 0.0}}
    config = tiny_config(folder, "stablesr", base, stage=stage, data={"lr_dir": str(lr_dir), "hr_dir": str(hr_dir),
                                                                      "crop": 64},
                         train={"steps": steps, "batch_size": 2 if stage == 1 else 1}, optimizers=optimizers,
                         method_args=method_args, **sections)
    config.weights = str(weights) if weights else None
    return config


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_stage1_loss_falls_through_the_loop(tiny_base, tmp_path, one_thread):
    from diffsr.training.loop import train
    from training_helpers import falls

    result = train(loop_config(tmp_path / "run", tiny_base, steps=30), resume=False, progress=False)
    first, last = falls(result["losses"]["loss_simple"])
    print(f"stage 1 through the loop: eps loss {first:.4f} -> {last:.4f} (mean of the first / last 5 steps)")
    assert last < 0.9 * first
    assert [p.name for p in result["release"]] == ["stablesr_000117.ckpt"]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_resume_continues_exactly(stage, tiny_base, release_weights, tmp_path, one_thread):
    """4 steps in one go == 2 steps, then 2 more resumed from the checkpoint (stage 2: the discriminator starts
    at step 2, so the resumed half runs the GAN, and the loop's step reaches the trainer)."""
    from diffsr.training.loop import train
    from training_helpers import logged

    weights = release_weights if stage == 2 else None
    whole = train(loop_config(tmp_path / "whole", tiny_base, stage, weights), resume=False, progress=False)
    train(loop_config(tmp_path / "split", tiny_base, stage, weights, steps=2), resume=False, progress=False)
    train(loop_config(tmp_path / "split", tiny_base, stage, weights, steps=4), resume=True, progress=False)
    assert logged(tmp_path / "split")[2:] == logged(tmp_path / "whole")[2:]
    first = torch.load(tmp_path / "whole" / "checkpoints" / "step-4" / "trained.pt")["trained"]
    second = torch.load(tmp_path / "split" / "checkpoints" / "step-4" / "trained.pt")["trained"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    if stage == 2:
        assert [round(line["d_weight"], 6) for line in logged(tmp_path / "whole")] == [0, 0, 0.025, 0.025]
        assert any(k.startswith("loss.discriminator.") and "running_mean" in k for k in first)
    assert whole["step"] == 4


def test_stage1_training_step_matches_the_release(tiny_base, release_weights, one_thread):
    """The loss and the gradient of every trained tensor against LatentDiffusionSRTextWT.p_losses on the same
    weights and inputs (tests/fixtures/stablesr/make_train_reference.py; gradients compared by their norms)."""
    from diffsr.checkpoints import ldm

    reference = parity_fixture("stablesr/stablesr_train_step.pt", tiny_base, release_weights,
                               release_weights.parent / "vqgan_cfw_00011.ckpt")
    trainer = StableSRStage1(tiny_base, weights=release_weights)
    loss = trainer.diffusion_loss(reference["latent_hr"], reference["latent_lr"], reference["t"], reference["noise"],
                                  reference["text"])
    loss.backward()
    unet = trainer.unet.unet
    sft = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    grads = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(sft, unet.config.layers_per_block).items()}
    encoder = {n: p.grad for n, p in trainer.encoder.named_parameters()}
    grads.update({ldm.ENCODER_PREFIX + k: v for k, v in ldm.encoder_to_ldm(encoder, trainer.encoder.config).items()})
    assert set(grads) == set(reference["trained"])  # the same tensors train
    norms = reference["grad_norms"]
    assert set(n for n, g in grads.items() if g.abs().sum() > 0) == set(n for n, v in norms.items() if v > 0)
    worst = max(abs(grads[n].norm().item() - v) / max(v, 1e-8) for n, v in norms.items() if v > 1e-6)
    print(f"stage 1 training step vs the release: loss {loss.item():.6f} / {reference['loss']:.6f}, "
          f"worst relative gradient-norm difference {worst:.1e}")
    assert loss.item() == pytest.approx(reference["loss"], rel=1e-5)
    assert worst < 1e-4


def test_mixed_precision_release_keeps_the_frozen_weights_in_float32(tiny_base, tmp_path, one_thread):
    """cast_frozen stores the frozen UNet/VAE in bf16 for training; the release file still holds them exactly."""
    from diffsr.checkpoints import ldm

    torch.manual_seed(0)
    trainer = StableSRStage1(tiny_base, encoder_channels=32)
    unet = trainer.unet.unet
    before = unet.conv_in.weight.detach().clone()
    trainer.cast_frozen(torch.bfloat16)
    assert unet.conv_in.weight.dtype == torch.bfloat16 and trainer.encoder.conv_in.weight.dtype == torch.float32
    [file] = trainer.save_release(tmp_path)
    state = torch.load(file)["state_dict"]
    assert torch.equal(state[ldm.UNET_PREFIX + "input_blocks.0.0.weight"], before)
    assert unet.conv_in.weight.dtype == torch.bfloat16  # training goes on in bf16


def test_mixed_precision_stage2_release_keeps_the_vae_in_float32(tiny_base, release_weights, tmp_path, one_thread):
    """Stage 2 under cast_frozen: both files it writes hold the frozen VAE exactly, the CFW file's fusion too."""
    torch.manual_seed(0)
    trainer = StableSRStage2(tiny_base, release_weights, latent_steps=1, perceptual_weight=0.0)
    vae = trainer.backbone.vae
    before = vae.decoder.conv_in.weight.detach().clone()
    trainer.cast_frozen(torch.bfloat16)
    assert vae.decoder.conv_in.weight.dtype == torch.bfloat16
    model_file, cfw_file = trainer.save_release(tmp_path)
    assert torch.equal(torch.load(model_file)["state_dict"]["first_stage_model.decoder.conv_in.weight"], before)
    cfw = torch.load(cfw_file)["state_dict"]
    assert torch.equal(cfw["decoder.conv_in.weight"], before)
    fusion = trainer.autoencoder.fusion.state_dict()["1.encode_enc_1.conv1.weight"]
    assert fusion.dtype == torch.float32 and torch.equal(cfw["decoder.fusion_layer_1.encode_enc_1.conv1.weight"], fusion)
