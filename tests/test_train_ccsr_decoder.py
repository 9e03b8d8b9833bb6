"""CCSR stage 2 (VAE decoder fine-tuning) on the tiny base: only the decoder and the discriminator train,
the reconstruction loss falls, the adversarial weight is the adaptive one, save_release writes a CCSR-v2
folder that diffsr.load_upscaler('ccsr') loads with the trained decoder, and resuming is exact."""

import pytest
import torch
import torch.nn.functional as F

import diffsr
from diffsr.training.base import state_digest
from diffsr.training.ccsr_decoder import CCSRStage2
from metric_helpers import metric_weights  # noqa: F401  (fixture)


def stage2(base, weights, **args):
    return CCSRStage2(diffsr.load_upscaler("ccsr", base=base, weights=weights), **args)


def crops(count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hr = F.interpolate(torch.rand(count, 3, 8, 8, generator=generator), size=(64, 64), mode="bilinear")
    return {"hr": hr, "lr": F.interpolate(hr, scale_factor=0.25, mode="area")}


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_decoder_trains_with_the_adaptive_gan_weight(tiny_base, ccsr_v2_weights, metric_weights, one_thread):  # noqa: F811
    torch.manual_seed(0)
    trainer = stage2(tiny_base, ccsr_v2_weights, lpips_weights=metric_weights)
    vae = trainer.vae
    groups = trainer.parameter_groups()
    assert set(map(id, groups["generator"])) == set(map(id, [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]))
    assert set(map(id, groups["discriminator"])) == set(map(id, trainer.loss.discriminator.parameters()))
    frozen = {name: state_digest(module) for name, module in trainer.frozen_modules().items()}
    batch = crops()

    def rec_loss():
        trainer.global_step = 0
        torch.manual_seed(0)
        with torch.no_grad():
            return trainer(dict(batch), "generator")[1]["loss_rec"]

    before = rec_loss()
    optimizers = {name: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9)) for name, params in groups.items()}
    for step in range(6):
        trainer.global_step = step
        torch.manual_seed(0)
        micro = dict(batch)
        for phase, name in trainer.phases:
            loss, logs = trainer(micro, phase)
            trainer.zero_grad(set_to_none=True)
            loss.backward()
            touched = {n.split(".")[0] + "." + n.split(".")[1] for n, p in trainer.named_parameters() if p.grad is not None}
            if phase == "generator":
                assert touched == {"vae.decoder", "vae.post_quant_conv"}
                # disc_start 1: off at step 0; then |grad rec| / |grad gan| at conv_out, x 0.5, never the bare 0.5
                assert (logs["d_weight"] > 0) == (step >= 1) and logs["d_weight"] != pytest.approx(0.5)
            else:
                assert touched == {"loss.discriminator"}
            optimizers[name].step()
    after = rec_loss()
    print(f"ccsr stage 2 reconstruction loss {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before
    assert {name: state_digest(module) for name, module in trainer.frozen_modules().items()} == frozen


def test_save_release_is_a_v2_folder_with_the_trained_decoder(tiny_base, ccsr_v2_weights, tmp_path, one_thread):
    torch.manual_seed(0)
    trainer = stage2(tiny_base, ccsr_v2_weights, perceptual_weight=0.0)
    with torch.no_grad():
        for p in trainer.parameter_groups()["generator"]:
            p.add_(torch.randn_like(p) * 0.01)
    latent, image = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = trainer.vae.decode(latent).sample
        restored = trainer.upscaler().restore(image, torch.Generator().manual_seed(1))
    # Mixed precision stores the frozen weights in bf16; the folder must still get their float32 values.
    trainer.cast_frozen(torch.bfloat16)
    files = trainer.save_release(tmp_path / "ccsr-v2")
    assert {f.relative_to(tmp_path / "ccsr-v2").parts[0] for f in files} == {"controlnet", "vae"}
    loaded = diffsr.load_upscaler("ccsr", base=tiny_base, weights=tmp_path / "ccsr-v2")
    with torch.no_grad():
        got = loaded.backbone.vae.decode(latent).sample
        same_restore = (loaded.restore(image, torch.Generator().manual_seed(1)) - restored).abs().max().item()
    print(f"ccsr stage 2 release round trip: decoder max abs diff {(got - expected).abs().max().item():.2e}, "
          f"restore {same_restore:.2e}")
    assert (got - expected).abs().max().item() < 1e-5 and same_restore < 1e-5


def test_resume_continues_exactly(tiny_base, ccsr_v2_weights, tmp_path, one_thread):
    from diffsr.training.loop import train
    from training_helpers import logged, pair_folders, tiny_config

    lr_dir, hr_dir = pair_folders(tmp_path / "pairs")

    def config(name, steps):
        optimizer = {"lr": 1e-3, "betas": [0.5, 0.9], "weight_decay": 0.0}
        config = tiny_config(tmp_path / name, "ccsr", tiny_base, stage=2,
                             data={"lr_dir": str(lr_dir), "hr_dir": str(hr_dir), "crop": 64},
                             train={"steps": steps}, optimizers={"generator": optimizer, "discriminator": optimizer},
                             method_args={"perceptual_weight": 0.0})
        config.weights = str(ccsr_v2_weights)
        return config

    train(config("whole", 4), resume=False, progress=False)
    train(config("split", 2), resume=False, progress=False)
    train(config("split", 4), resume=True, progress=False)
    assert logged(tmp_path / "split")[2:] == logged(tmp_path / "whole")[2:]
    first = torch.load(tmp_path / "whole" / "checkpoints" / "step-4" / "trained.pt")["trained"]
    second = torch.load(tmp_path / "split" / "checkpoints" / "step-4" / "trained.pt")["trained"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base, ccsr_v2_weights, one_thread):
    torch.manual_seed(0)
    trainer = stage2(tiny_base, ccsr_v2_weights, perceptual_weight=0.0)
    batch = crops()

    def gradients():
        trainer.zero_grad(set_to_none=True)
        trainer.global_step = 5
        torch.manual_seed(2)
        trainer(dict(batch), "generator")[0].backward()
        return {n: p.grad.clone() for n, p in trainer.named_parameters() if p.grad is not None}

    plain = gradients()
    trainer.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and plain
    assert max((plain[n] - checkpointed[n]).abs().max().item() for n in plain) < 1e-6
