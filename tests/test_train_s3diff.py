"""S3Diff trainer: the loss falls, frozen parts stay, gradients reach the degradation-guided LoRA, online
negative prompting, the GAN's loss and direction, the release files it writes."""

import pytest
import torch
import torch.nn.functional as F

import diffsr
from conftest import parity_fixture, smooth_image
from metric_helpers import metric_weights  # noqa: F401  (fixture)
from training_helpers import falls, logged, pair_folders, tiny_config
from diffsr.errors import UsageError, WeightsError


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A random DINO-shaped ViT (8 blocks, 7 x 7 patches of 32 px) saved as a transformers folder."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=8, num_attention_heads=2, intermediate_size=32,
                       image_size=224, patch_size=32)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def build(tiny_base, s3diff_weights, tiny_dino, metric_weights, one_thread):  # noqa: F811
    """build(**method_args) -> S3DiffTrainer on the tiny models (from scratch unless weights= is given)."""
    from diffsr.training.s3diff import S3DiffTrainer

    def make(**args):
        torch.manual_seed(0)
        args = {"de_net": s3diff_weights.parent / "de_net.pth", "dino": tiny_dino, "lpips_weights": metric_weights,
                **args}
        return S3DiffTrainer.build(tiny_base, **args)

    return make


def pictures(count=1, size=64, seed=0):
    hr = torch.stack([torch.from_numpy(smooth_image(size, size, seed + i)).permute(2, 0, 1) for i in range(count)])
    hr = hr.float() / 255
    return {"lr": F.interpolate(hr, scale_factor=0.25, mode="area"), "hr": hr}


def run_iteration(trainer, optimizers, groups, batch, step):
    """One iteration as the loop runs it: each phase's loss, backward, clip at 1, its optimiser steps."""
    torch.manual_seed(step)
    batch, losses = dict(batch), {}
    for phase, name in trainer.phases:
        loss, logs = trainer(batch, phase)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(groups[name], 1.0)
        optimizers[name].step()
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        losses[phase] = loss.item()
    return losses


def optimisers(trainer, lr):
    groups = trainer.parameter_groups()
    return {name: torch.optim.AdamW(params, lr=lr, weight_decay=1e-2) for name, params in groups.items()}, groups


# -- training ---------------------------------------------------------------------------------------------

def loop_config(output_dir, tiny_base, pairs, s3diff_weights, tiny_dino, metric_weights, **sections):  # noqa: F811
    lr_dir, hr_dir = pairs
    return tiny_config(output_dir, "s3diff", tiny_base, data={"lr_dir": str(lr_dir), "hr_dir": str(hr_dir), "crop": 64},
                       method_args={"de_net": str(s3diff_weights.parent / "de_net.pth"), "dino": str(tiny_dino),
                                    "lpips_weights": str(metric_weights)},
                       optimizers={"generator": {"lr": 3e-3}, "discriminator": {"lr": 3e-3}}, **sections)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return pair_folders(tmp_path_factory.mktemp("s3diff-pairs"), count=2)


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_loss_falls_through_the_loop_and_the_release_holds_the_result(
        tmp_path, tiny_base, pairs, s3diff_weights, tiny_dino, metric_weights, one_thread):  # noqa: F811
    from diffsr.training.loop import train

    config = loop_config(tmp_path / "run", tiny_base, pairs, s3diff_weights, tiny_dino, metric_weights,
                         train={"steps": 16, "save_every": 16})
    result = train(config, progress=False)
    rows = logged(tmp_path / "run")
    assert len(rows) == 16 and all(len(row) == 7 for row in rows)  # step + the three phases' numbers
    first, last = falls([row["loss_l2"] + row["loss_lpips"] for row in rows], window=4)
    print(f"S3Diff reconstruction loss (2 MSE + 5 LPIPS): first 4 steps {first:.4f}, last 4 {last:.4f}")
    assert last < 0.9 * first
    # The release files hold exactly the trained tensors of the last checkpoint, and load.
    weights, de_net = result["release"]
    assert (weights.name, de_net.name) == ("s3diff.pkl", "de_net.pth")
    released = torch.load(weights, weights_only=False)
    trained = torch.load(tmp_path / "run" / "checkpoints" / "step-16" / "trained.pt", weights_only=False)["trained"]
    for part in ("unet", "vae"):
        for key, value in released[f"state_dict_{part}"].items():
            assert torch.equal(value, trained[f"{part}.{key}"]), key
    assert torch.equal(released["state_dict_unet_fuse_mlp"]["weight"], trained["conditioner.unet_fuse_mlp.weight"])
    diffsr.load_upscaler("s3diff", base=tiny_base, weights=weights)(smooth_image(16, 16), scale=4)


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_resume_continues_exactly(tmp_path, tiny_base, pairs, s3diff_weights, tiny_dino, metric_weights,
                                  one_thread):  # noqa: F811
    from diffsr.training.loop import train

    def run(name, steps):
        config = loop_config(tmp_path / name, tiny_base, pairs, s3diff_weights, tiny_dino, metric_weights,
                             train={"steps": steps, "save_every": 2})
        torch.manual_seed(0)  # the same fresh adapters and heads in both runs, as in two new processes
        return train(config, progress=False)

    straight = run("straight", 4)
    run("split", 2)
    resumed = run("split", 4)
    assert resumed["losses"]["loss_l2"] == straight["losses"]["loss_l2"][2:]
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    a, b = (torch.load(tmp_path / name / "checkpoints" / "step-4" / "trained.pt", weights_only=False)["trained"]
            for name in ("straight", "split"))
    assert a.keys() == b.keys() and any("weight_u" in name for name in a)  # the spectral norms' state too
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_training_leaves_the_frozen_parts(build):
    from diffsr.training.base import frozen_digest, state_digest

    trainer = build()
    frozen = frozen_digest(trainer)
    modules = {name: state_digest(module) for name, module in trainer.frozen_modules().items()}
    assert modules.keys() == {"unet", "vae", "text_encoder", "estimator", "dino"}
    optimizers, groups = optimisers(trainer, lr=1e-3)
    before = {name: p.detach().clone() for name, p in trainer.named_parameters() if p.requires_grad}
    for step in range(3):
        losses = run_iteration(trainer, optimizers, groups, pictures(), step)
        assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    assert frozen_digest(trainer) == frozen
    assert {name: state_digest(module) for name, module in trainer.frozen_modules().items()} == modules
    moved = [name for name, p in trainer.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert len(moved) == len(before)


def test_what_trains_and_where_gradients_go(build, s3diff_weights):
    trainer = build(weights=s3diff_weights)  # released-format weights: B and the MLPs are non-zero
    groups = trainer.parameter_groups()
    generator = {id(p) for p in groups["generator"]}
    named = dict(trainer.named_parameters())
    trained = {name for name, p in named.items() if id(p) in generator}
    assert trained == {name for name, p in named.items() if p.requires_grad and "discriminator" not in name}
    assert {name for name in trained if name.startswith("unet.") and "lora" not in name} == {
        "unet.conv_in.weight", "unet.conv_in.bias"}
    assert all(name.startswith("vae.encoder.") and "lora" in name for name in trained if name.startswith("vae."))
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in trainer.discriminator.heads.parameters()}

    batch = pictures(2)
    loss, _ = trainer(batch, "reconstruction")
    loss.backward()
    missing = [name for name in trained if named[name].grad is None or not named[name].grad.abs().sum() > 0]
    assert not missing, missing  # every LoRA A and B, conv_in, every MLP and both block embeddings
    assert all(p.grad is None for p in trainer.discriminator.heads.parameters())
    trainer.zero_grad(set_to_none=True)

    loss, _ = trainer(batch, "adversarial")  # the generator's GAN loss: the heads take no gradient
    loss.backward()
    assert all(p.grad is None for p in trainer.discriminator.heads.parameters())
    assert named["conditioner.unet_fuse_mlp.weight"].grad.abs().sum() > 0
    trainer.zero_grad(set_to_none=True)

    loss, _ = trainer(batch, "discriminator")  # fake = the adversarial phase's output, detached
    loss.backward()
    assert all(p.grad is not None for p in trainer.discriminator.heads.parameters())
    assert all(named[name].grad is None for name in trained)


def test_trains_the_method_load_upscaler_built(tiny_base, s3diff_weights, tiny_dino, metric_weights,  # noqa: F811
                                                one_thread):
    from diffsr.training.s3diff import S3DiffTrainer

    method = diffsr.load_upscaler("s3diff", base=tiny_base, weights=s3diff_weights)
    trainer = S3DiffTrainer(method, s3diff_weights.parent / "de_net.pth", dino=tiny_dino, lpips_weights=metric_weights)
    assert trainer.upscaler() is method and trainer.unet is method.backbone.unet
    assert trainer.conditioner is method.conditioner and trainer.estimator is method.estimator
    loss, _ = trainer(pictures(), "reconstruction")
    loss.backward()
    assert method.conditioner.unet_fuse_mlp.weight.grad.abs().sum() > 0  # the method's own modules learn
    assert method.backbone.unet.conv_in.weight.grad.abs().sum() > 0


def test_training_step_matches_the_release(build, tiny_base, s3diff_weights):
    """The authors' training model (src/s3diff.py) on the same tiny weights, inputs and posterior draw
    (tests/fixtures/s3diff/make_train_parity_fixture.py): output, 2 x MSE with online negative prompting for
    the first sample, and its gradients in conv_in, LoRA A and B, the MLPs and the block embeddings."""
    from diffsr.methods.s3diff import NEGATIVE_PROMPT, POSITIVE_PROMPT

    fixture = parity_fixture("s3diff/train_parity.pt", tiny_base, s3diff_weights, s3diff_weights.parent / "de_net.pth")
    trainer = build(weights=s3diff_weights)
    trainer.train()
    batch = {"lr": fixture["lr"], "hr": fixture["hr"]}
    trainer.prepare(batch)
    assert (batch["scores"] - fixture["scores"]).abs().max() < 1e-6
    negative = fixture["negative"]
    target = torch.where(negative[:, None, None, None], batch["source"], batch["hr"] * 2 - 1)
    text = trainer.method.backbone.encode_prompt([NEGATIVE_PROMPT, POSITIVE_PROMPT])
    torch.manual_seed(fixture["seed"])
    output = trainer.generate(batch["source"], batch["scores"], text)
    loss = F.mse_loss(output, target) * 2.0
    loss.backward()
    differences = {"output": (output - fixture["output"]).abs().max().item(),
                   "loss_l2": abs(loss.item() - fixture["loss_l2"].item())}
    named = dict(trainer.named_parameters())
    for name, (values, norm) in fixture["gradients"].items():
        ours = named[name if name.startswith(("unet.", "vae.")) else f"conditioner.{name}"].grad
        differences[name] = ((ours.flatten()[:256] - values).abs().max() / norm).item()  # relative to the norm
        assert abs(ours.norm() / norm - 1) < 1e-4, name
    print("max abs difference to the release's training step:", {k: f"{v:.1e}" for k, v in differences.items()})
    assert max(differences.values()) < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(build, s3diff_weights):
    trainer = build(weights=s3diff_weights)
    batch = pictures()

    def gradients():
        torch.manual_seed(1)
        loss, _ = trainer(dict(batch), "reconstruction")
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.named_parameters() if p.grad is not None}
        trainer.zero_grad(set_to_none=True)
        return grads

    plain = gradients()
    trainer.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) < 1e-5


def test_online_negative_prompting(build, monkeypatch):
    """With probability 1 every sample gets the negative prompt and the upscaled LR as its target."""
    from diffsr.methods.s3diff import NEGATIVE_PROMPT, POSITIVE_PROMPT

    for probability, prompt in ((1.0, NEGATIVE_PROMPT), (0.0, POSITIVE_PROMPT)):
        trainer = build(negative_prob=probability)
        seen = {}
        generate = trainer.generate

        def spy(source, scores, text):
            seen["text"] = text
            seen["output"] = generate(source, scores, text)
            return seen["output"]

        monkeypatch.setattr(trainer, "generate", spy)
        batch = pictures(2)
        with torch.no_grad():
            loss, logs = trainer(batch, "reconstruction")
        expected_text = trainer.method.backbone.encode_prompt([prompt])
        assert torch.equal(seen["text"], expected_text.expand(2, -1, -1))
        upscaled = F.interpolate(batch["lr"], size=(64, 64), mode="bicubic").clamp(0, 1) * 2 - 1
        target = upscaled if probability == 1 else batch["hr"] * 2 - 1
        output = seen["output"]
        with torch.no_grad():
            expected = 2 * F.mse_loss(output, target) + 5 * trainer.perceptual(output, target)
        assert abs(loss.item() - expected.item()) < 1e-5
        assert logs["negative_fraction"] == probability


# -- the discriminator --------------------------------------------------------------------------------

def test_gan_loss_is_the_multilevel_sigmoid_with_smoothed_real_labels(build, monkeypatch):
    trainer = build()
    discriminator = trainer.discriminator
    logits = [torch.tensor([[[0.5, -1.0], [2.0, 0.0]]]), torch.tensor([[[1.5]]]), torch.tensor([[-0.25]])]
    monkeypatch.setattr(discriminator, "logits", lambda images, heads_trained=True: logits)

    def bce(x, target):  # -(t log s(x) + (1 - t) log(1 - s(x)))
        return -(target * torch.sigmoid(x).log() + (1 - target) * (1 - torch.sigmoid(x)).log()).mean()

    image = torch.zeros(1, 3, 64, 64)
    for real, target in ((True, 0.8), (False, 0.0)):
        expected = sum(bce(level, target) for level in logits)
        assert abs(discriminator.loss(image, real=real).item() - expected.item()) < 1e-6


def test_discriminator_step_separates_real_from_fake(build):
    """Its own steps lower the discriminator's loss: real scored as real, the generator's output as fake."""
    trainer = build()
    batch = pictures(2)
    with torch.no_grad():
        trainer(batch, "adversarial")  # leaves batch["fake"]
    optimizer = torch.optim.AdamW(trainer.parameter_groups()["discriminator"], lr=1e-3)

    def loss(seed=123):
        torch.manual_seed(seed)  # the same DiffAugment draws each time
        with torch.no_grad():
            return trainer(batch, "discriminator")[0].item()

    before = loss()
    for step in range(10):
        torch.manual_seed(step)
        value, _ = trainer(batch, "discriminator")
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = loss()
    print(f"discriminator loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.05
    # The generator's adversarial loss on the same fake images rose: the labels point the right way.
    torch.manual_seed(123)
    real_as_real = trainer.discriminator.loss(batch["hr"] * 2 - 1, real=True).mean()
    torch.manual_seed(123)
    fake_as_real = trainer.discriminator.loss(batch["fake"], real=True).mean()
    assert fake_as_real > real_as_real


def test_discriminator_matches_vision_aided_loss(tmp_path):
    """The release's discriminator (vision_aided_loss + DINO) on the same seeded weights, images and random
    draws (tests/fixtures/s3diff/make_gan_fixture.py): features, logits, losses, the generator's image
    gradient and the spectral norms' power iterations."""
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    from diffsr.training.gan import VisionAidedDiscriminator, load_dino

    folder = Path(__file__).parent / "fixtures" / "s3diff"
    sys.path.insert(0, str(folder))
    import gan_weights as gw

    fixture = torch.load(folder / "gan_parity.pt")
    # A folder as facebook/dino-vitb16 on the hub has it (its tensor names and LayerNorm eps 1e-12).
    gw.transformers_config().save_pretrained(tmp_path)
    save_file(gw.dino_to_transformers(gw.seeded(gw.dino_layout(), seed=10)), tmp_path / "model.safetensors")
    discriminator = VisionAidedDiscriminator(load_dino(tmp_path))
    assert discriminator.dino.config.layer_norm_eps == 1e-6
    layout = [(name, tuple(value.shape)) for name, value in discriminator.heads.state_dict().items()
              if not name.endswith("filt")]
    assert layout == fixture["head_layout"]  # the same module names as vision_aided_loss's MultiLevelDViT
    discriminator.heads.load_state_dict(gw.seeded(dict(layout), seed=20), strict=False)
    discriminator.train()
    images = gw.images()
    differences = {}

    def compare(name, ours, theirs):
        differences[name] = (ours - theirs).abs().max().item()

    discriminator.augment = False
    with torch.no_grad():
        features = discriminator.features(images)
    discriminator.augment = True
    compare("class token", features[2], fixture["class_token"])
    for level in range(2):
        compare(f"map {level}", features[level][:, :8], fixture["map_slices"][level])
    torch.manual_seed(100)
    compare("loss real", discriminator.loss(images, real=True).detach(), fixture["loss_real"][:, 0])
    torch.manual_seed(101)
    compare("loss fake", discriminator.loss(images.flip(-1), real=False).detach(), fixture["loss_fake"][:, 0])
    generated = images.clone().requires_grad_(True)
    torch.manual_seed(102)
    loss = discriminator.loss(generated, real=True, heads_trained=False)
    loss.mean().backward()
    compare("loss generator", loss.detach(), fixture["loss_g"][:, 0])
    compare("generator image gradient", generated.grad / fixture["grad_g"].abs().max(),
            fixture["grad_g"] / fixture["grad_g"].abs().max())
    torch.manual_seed(103)
    with torch.no_grad():
        for level, (ours, theirs) in enumerate(zip(discriminator.logits(images), fixture["logits"])):
            compare(f"logits {level}", ours, theirs)
    state = discriminator.heads.state_dict()
    for name, value in fixture["power_vectors"].items():
        compare(name, state[name], value)
    print("max abs difference to vision_aided_loss:", {k: f"{v:.1e}" for k, v in differences.items()})
    assert max(differences.values()) < 1e-4


def test_diff_augment_is_differentiable_and_seeded():
    from diffsr.training.gan import diff_augment

    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    torch.manual_seed(5)
    first = diff_augment(x)
    torch.manual_seed(5)
    assert torch.equal(first, diff_augment(x))
    first.sum().backward()
    assert x.grad.abs().sum() > 0
    assert (first == 0).flatten(1).float().mean(1).min() > 0.2  # cutout zeroes about a quarter


# -- release files ----------------------------------------------------------------------------------

@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_save_release_loads_and_reproduces_the_trainer(build, tiny_base, tmp_path):
    trainer = build()
    optimizers, groups = optimisers(trainer, lr=1e-3)
    for step in range(2):  # make B and the MLPs non-trivial
        run_iteration(trainer, optimizers, groups, pictures(), step)
    files = trainer.save_release(tmp_path / "release")
    assert [f.name for f in files] == ["s3diff.pkl", "de_net.pth"]
    loaded = diffsr.load_upscaler("s3diff", base=tiny_base, weights=files[0])
    image = smooth_image(16, 16, seed=7)
    with torch.no_grad():
        ours = trainer.upscaler()(image, scale=4)
    theirs = loaded(image, scale=4)
    import numpy as np

    assert np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16)).max() <= 1
    lr = torch.rand(1, 3, 64, 64)
    generator = torch.Generator()
    restored = [model.restore(lr, generator, degradation=(0.3, 0.6)) for model in (trainer.upscaler(), loaded)]
    assert (restored[0] - restored[1]).abs().max() < 1e-5
    assert trainer.conditioner.unet_fuse_mlp.weight.requires_grad  # the validation upscaler froze nothing


# -- bad input ------------------------------------------------------------------------------------

def test_bad_input(build, tiny_base, tmp_path, s3diff_weights):
    from diffsr.training.s3diff import S3DiffTrainer

    with pytest.raises(UsageError, match="de_net"):
        S3DiffTrainer.build(tiny_base)
    with pytest.raises(WeightsError, match="DINO backbone"):
        build(dino=tmp_path / "no-such-dino")
    with pytest.raises(UsageError, match="lora_rank_unet 8 differs"):
        build(weights=s3diff_weights, lora_rank_unet=8)
    trainer = build()
    with pytest.raises(UsageError, match="multiples of 8"):
        trainer(pictures(size=60), "reconstruction")
    with pytest.raises(UsageError, match="no training phase"):
        trainer(pictures(), "warmup")


def test_configs_load_and_the_tiny_one_trains(tmp_path, tiny_base, s3diff_weights, tiny_dino, metric_weights,
                                              one_thread):  # noqa: F811
    from pathlib import Path

    from diffsr.training.config import load_config
    from diffsr.training.loop import train
    from training_helpers import hr_folder

    configs = Path(__file__).parent.parent / "configs" / "train"
    paper = load_config(configs / "s3diff.yaml")
    assert (paper.optimizers["generator"].lr, paper.method_args["lambda_l2"], paper.method_args["lambda_lpips"],
            paper.method_args["lambda_gan"], paper.method_args["negative_prob"]) == (2e-5, 2.0, 5.0, 0.5, 0.05)
    overrides = {"base": str(tiny_base), "output_dir": str(tmp_path / "run"), "train.steps": 2,
                 "data.hr": [str(hr_folder(tmp_path / "hr", count=2))],
                 "method_args.de_net": str(s3diff_weights.parent / "de_net.pth"),
                 "method_args.dino": str(tiny_dino), "method_args.lpips_weights": str(metric_weights)}
    config = load_config(configs / "tiny" / "s3diff.yaml", overrides)
    assert config.data.degradation == "s3diff"
    result = train(config, progress=False)  # HR crops degraded on the fly with S3Diff's settings
    assert len(result["losses"]["loss_l2"]) == 2 and [f.name for f in result["release"]] == ["s3diff.pkl", "de_net.pth"]
