"""CCSR stage-1 training (diffsr.training.ccsr): the truncated-diffusion losses on tiny models."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diffsr
from diffsr.errors import BaseModelError, UsageError, WeightsError
from diffsr.training import trainer_class
from diffsr.training.base import state_digest
from conftest import parity_fixture, smooth_image
from diffsr.methods.ccsr import CCSR
from diffsr.training.ccsr import CCSRStage1, eps_loss, resize_back, truncated_losses

STEPS = 20


def stage1(base, weights=None, **args):
    """The stage-1 trainer on a model to train: from `weights` (a CCSR-v2 folder) or fresh."""
    return CCSRStage1(CCSR.for_training(base, weights), **args)


def batches(count=2, size=64, seed=0):
    """Smooth random HR crops and their 4x smaller LR (area)."""
    generator = torch.Generator().manual_seed(seed)
    hr = F.avg_pool2d(torch.rand(count * 2, 3, size, size, generator=generator), 5, 1, 2)
    lr = F.interpolate(hr, scale_factor=0.25, mode="area")
    return [{"hr": hr[i:i + 2], "lr": lr[i:i + 2]} for i in range(0, count * 2, 2)]


def evaluation_loss(trainer, data):
    """The training loss on fixed data and fixed noise (the same draws before and after training)."""
    with torch.no_grad():
        losses = []
        for index, batch in enumerate(data):
            torch.manual_seed(1000 + index)
            losses.append(trainer(batch, "controlnet")[0].item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def trained(tiny_base, one_thread):
    """A tiny stage-1 run: the shared loop's iteration (run_step: autocast, backward, clipping, AdamW step)."""
    from accelerate import Accelerator

    from diffsr.training.loop import run_step

    torch.manual_seed(0)
    trainer = trainer_class("ccsr", 1)(CCSR.for_training(tiny_base))
    frozen = {name: state_digest(module) for name, module in trainer.frozen_modules().items()}
    controlnet_before = state_digest(trainer.controlnet)
    data = batches()
    before = evaluation_loss(trainer, data)
    groups = trainer.parameter_groups()
    optimizers = {"controlnet": torch.optim.AdamW(groups["controlnet"], lr=2e-3)}
    accelerator = Accelerator(cpu=True)
    for step in range(STEPS):
        torch.manual_seed(step)
        logs = run_step(accelerator, trainer, trainer, [data[step % len(data)]], optimizers, groups, 1.0)
    after = evaluation_loss(trainer, data)
    return dict(trainer=trainer, frozen=frozen, controlnet_before=controlnet_before, before=before, after=after,
                logs=logs)


def test_loss_falls(trained):
    print(f"stage-1 loss on fixed data and noise: {trained['before']:.2f} -> {trained['after']:.2f} after {STEPS} steps")
    assert trained["after"] < 0.85 * trained["before"]
    assert set(trained["logs"]) == {"loss", "loss_eps", "loss_x0_T", "loss_x0_tmax"}
    assert all(math.isfinite(value) for value in trained["logs"].values())


def test_only_the_controlnet_changes(trained):
    trainer = trained["trainer"]
    assert {name: state_digest(module) for name, module in trainer.frozen_modules().items()} == trained["frozen"]
    assert state_digest(trainer.controlnet) != trained["controlnet_before"]
    trained_names = {name for name, p in trainer.named_parameters() if p.requires_grad}
    assert trained_names and all(name.startswith("controlnet.") for name in trained_names)
    assert "controlnet.condition_conv_in.weight" in trained_names


# -- the losses, by hand ---------------------------------------------------------------------------

class RecordingModel:
    """model(x, t) -> eps: returns the given eps tensors in turn (leaves, to take gradients) and records calls."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        return self.outputs[len(self.calls) - 1]


def test_x0_loss_gradients_are_the_analytic_ones():
    """l_T and l_tmax w.r.t. the eps predictions at T and t_max, against x0 = (z_t - sqrt(1-a) eps) / sqrt(a)."""
    alphas_cumprod = torch.linspace(0.999, 0.004, 1000, dtype=torch.float64).float()
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = [torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in (1, 2, 3)]
    model = RecordingModel(eps)
    losses = truncated_losses(model, z0, alphas_cumprod, t_max=667)
    (losses["x0_T"] + losses["x0_tmax"]).backward()

    (x_t, t), (x_T, T), (x_tmax, tmax) = model.calls
    assert T.tolist() == [999, 999] and tmax.tolist() == [667, 667]  # the t = T branch for every sample
    a_T, a_m, n = alphas_cumprod[999], alphas_cumprod[667], z0.numel()
    x0_T = (x_T - (1 - a_T).sqrt() * eps[1].detach()) / a_T.sqrt()
    x0_tmax = (x_tmax - (1 - a_m).sqrt() * eps[2].detach()) / a_m.sqrt()
    assert torch.allclose(losses["x0_T"], ((x0_T - z0) ** 2).mean())
    assert torch.allclose(losses["x0_tmax"], ((x0_tmax - z0) ** 2).mean())
    # d l_tmax / d eps_tmax; and eps_T reaches both terms: x_tmax = sqrt(a_m) x0_T + sqrt(1 - a_m) noise.
    grad_tmax = -2 / n * ((1 - a_m) / a_m).sqrt() * (x0_tmax - z0)
    grad_T = -2 / n * ((1 - a_T) / a_T).sqrt() * ((x0_T - z0) + (x0_tmax - z0))
    assert torch.allclose(eps[2].grad, grad_tmax, rtol=1e-4, atol=1e-6)
    assert torch.allclose(eps[1].grad, grad_T, rtol=1e-4, atol=1e-6)
    assert eps[0].grad is None  # the eps loss term is separate
    # The eps term: plain MSE against the noise at t in [0, t_max).
    noise = (x_t - alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * z0) / (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(losses["eps"], ((eps[0] - noise) ** 2).mean(), atol=1e-5)


def test_timesteps_are_the_releases():
    """eps loss at t uniform in {0, ..., t_max - 1}; every sample also takes the x0 branch at T and t_max."""
    z0 = torch.zeros(4000, 1, 1, 1)
    model = RecordingModel([torch.zeros_like(z0)] * 3)
    torch.manual_seed(0)
    truncated_losses(model, z0, torch.linspace(0.999, 0.004, 1000), t_max=667)
    t = model.calls[0][1]
    assert t.min() == 0 and t.max() == 666
    assert abs(t.float().mean().item() - 333) < 10
    assert (model.calls[1][1] == 999).all() and (model.calls[2][1] == 667).all()


def test_resize_back_is_8_bit_at_the_hr_size():
    """Each image of a batch takes its own mode (area, bilinear or bicubic), as each item of the release's loader."""
    lr = torch.rand(1, 3, 8, 8).expand(12, -1, -1, -1)
    torch.manual_seed(0)
    up = resize_back(lr, (32, 32))
    assert up.shape == (12, 3, 32, 32) and torch.equal(up, torch.round(up * 255) / 255)
    assert len({tuple(row.flatten()[:4].tolist()) for row in up}) == 3


# -- parity with the release's training step --------------------------------------------------------

def test_matches_the_release_training_step(tiny_base, ccsr_v2_weights, one_thread):
    """train_ccsr_stage1.py's step on the same tiny models, latents and seed (fixtures/ccsr/README.md)."""
    reference = parity_fixture("ccsr/ccsr_train_parity.pt", tiny_base, ccsr_v2_weights / "controlnet")
    trainer = stage1(tiny_base, ccsr_v2_weights)
    torch.manual_seed(reference["seed"])
    losses = truncated_losses(trainer.eps_model(reference["condition"]), reference["hr_latent"],
                              trainer.alphas_cumprod, trainer.t_max)
    sum(losses.values()).backward()
    for name, value in losses.items():
        print(f"loss {name}: ours {value.item():.6f}, release {reference['loss_' + name]:.6f}")
        assert value.item() == pytest.approx(reference["loss_" + name], rel=1e-5)
    parameters = dict(trainer.controlnet.named_parameters())
    for name, gradient in reference["gradients"].items():
        difference = (parameters[name].grad - gradient).abs().max().item()
        print(f"gradient {name}: max abs difference {difference:.1e} (scale {gradient.abs().max().item():.1e})")
        assert difference <= 1e-4 * gradient.abs().max().item()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base, ccsr_v2_weights, one_thread):
    trainer = stage1(tiny_base, ccsr_v2_weights)
    batch = batches(1)[0]

    def gradients():
        trainer.controlnet.zero_grad()
        torch.manual_seed(0)
        trainer(batch, "controlnet")[0].backward()
        return {name: p.grad.clone() for name, p in trainer.controlnet.named_parameters()}

    plain = gradients()
    trainer.enable_gradient_checkpointing()
    assert trainer.unet.is_gradient_checkpointing and trainer.controlnet.is_gradient_checkpointing
    checkpointed = gradients()
    assert all(torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6) for name in plain)


# -- through the loop, from the tiny config ------------------------------------------------------------

def test_tiny_config_trains_and_resumes_exactly(tiny_base, tmp_path, one_thread):
    """configs/train/tiny/ccsr_stage1.yaml through diffsr.training.loop.train: 4 steps at once, or 2 steps and
    then 2 more resumed from the checkpoint, give the same losses and the same weights."""
    from diffsr.training.config import load_config
    from diffsr.training.loop import train

    root = Path(__file__).parents[1]
    overrides = {"base": str(tiny_base), "data.hr": [str(root / "src/diffsr/data")], "train.batch_size": 1,
                 "train.save_every": 2}

    def run(output_dir, steps, **more):
        config = load_config(root / "configs/train/tiny/ccsr_stage1.yaml",
                             {**overrides, "output_dir": str(output_dir), "train.steps": steps, **more})
        return train(config, progress=False)

    Image.fromarray(smooth_image(24, 20)).save(tmp_path / "val.png")
    whole = run(tmp_path / "whole", 4, **{"validation.images": [str(tmp_path / "val.png")]})
    validation = Image.open(tmp_path / "whole" / "validation" / "step-4" / "val.png")
    assert validation.size == (80, 96)  # the trainer's upscaler at x4
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4)
    print("losses, whole run:", [round(v, 3) for v in whole["losses"]["loss"]],
          "resumed:", [round(v, 3) for v in resumed["losses"]["loss"]])
    assert len(resumed["losses"]["loss"]) == 2 and resumed["losses"]["loss"] == whole["losses"]["loss"][2:]
    assert all(math.isfinite(v) for v in whole["losses"]["loss"])
    whole_net = stage1(tiny_base, tmp_path / "whole" / "release").controlnet
    resumed_net = stage1(tiny_base, tmp_path / "split" / "release").controlnet
    assert state_digest(whole_net) == state_digest(resumed_net)


# -- weights in and out ------------------------------------------------------------------------------

def test_saved_release_loads_and_reproduces_the_trainer(trained, tiny_base, tmp_path):
    trainer = trained["trainer"]
    files = trainer.save_release(tmp_path / "ccsr-v2")
    names = {file.relative_to(tmp_path / "ccsr-v2").as_posix() for file in files}
    assert {"controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors", "vae/config.json"} <= names
    loaded = diffsr.load_upscaler("ccsr", base=tiny_base, weights=tmp_path / "ccsr-v2")
    lr = batches()[0]["lr"][:1]
    with torch.no_grad():
        ours = trainer.upscaler().restore(lr, torch.Generator().manual_seed(0), steps=4, t_max=0.75, t_min=0.0)
        theirs = loaded.restore(lr, torch.Generator().manual_seed(0), steps=4, t_max=0.75, t_min=0.0)
    difference = (ours - theirs).abs().max().item()
    print(f"saved release vs the trainer's upscaler: max abs difference {difference:.1e}")
    assert difference <= 1e-5  # the same weights; only float summation order may differ
    # ... and training can start again from it.
    again = stage1(tiny_base, tmp_path / "ccsr-v2")
    assert state_digest(again.controlnet) == state_digest(trainer.controlnet)


def test_starts_from_a_release_folder(tiny_base, ccsr_v2_weights):
    trainer = stage1(tiny_base, ccsr_v2_weights)
    release = diffsr.load_upscaler("ccsr", base=tiny_base, weights=ccsr_v2_weights)
    assert state_digest(trainer.controlnet) == state_digest(release.controlnet)
    assert state_digest(trainer.vae) == state_digest(release.backbone.vae)  # its stage-2 VAE comes along


def test_fresh_controlnet_is_the_unet_copy(tiny_base):
    trainer = stage1(tiny_base)
    unet, controlnet = trainer.unet.state_dict(), trainer.controlnet.state_dict()
    assert torch.equal(controlnet["down_blocks.0.resnets.0.conv1.weight"], unet["down_blocks.0.resnets.0.conv1.weight"])
    assert not controlnet["controlnet_mid_block.weight"].any()  # zero convs
    assert controlnet["condition_conv_in.weight"].any()  # torch's default init, as the release


def test_bad_arguments(tiny_base, ccsr_v2_weights):
    with pytest.raises(WeightsError, match="a folder"):
        stage1(tiny_base, ccsr_v2_weights / "controlnet" / "config.json")
    with pytest.raises(WeightsError, match="controlnet/config.json"):
        stage1(tiny_base, ccsr_v2_weights / "vae")
    for t_max in (1.5, 0.9995, 0.0, "0.6"):
        with pytest.raises(UsageError, match="t_max"):
            stage1(tiny_base, t_max=t_max)


def test_refuses_a_v_prediction_base(tmp_path):
    from diffsr.testing import make_tiny_base

    base = make_tiny_base(tmp_path / "v-base", prediction_type="v_prediction")
    with pytest.raises(BaseModelError, match="epsilon"):
        stage1(base)


def test_pretraining_is_the_plain_eps_loss(tiny_base, one_thread):
    """pretrain=True (the release's train_controlnet.py): only the eps loss, t uniform over all 1000 steps."""
    trainer = stage1(tiny_base, pretrain=True)
    torch.manual_seed(0)
    loss, logs = trainer(batches(1)[0], "controlnet")
    assert set(logs) == {"loss", "loss_eps"} and loss.item() == pytest.approx(logs["loss_eps"])
    model = RecordingModel([torch.zeros(4000, 1, 1, 1)])
    eps_loss(model, torch.zeros(4000, 1, 1, 1), trainer.alphas_cumprod, len(trainer.alphas_cumprod))
    t = model.calls[0][1]
    assert t.min() == 0 and t.max() == 999 and len(model.calls) == 1
