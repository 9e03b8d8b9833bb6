"""OSEDiff training: VSD gradient, the regularizer/teacher UNet, loss falling, release round trip."""

import copy

import pytest
import torch

import diffsr
from diffsr.training.loop import train
from diffsr.samplers import alpha_bar_at, q_sample, x0_from_eps
from diffsr.training.osediff import OSEDiffTrainer, vsd_loss
from metric_helpers import metric_weights  # noqa: F401  (fixture)
from training_helpers import falls, logged, pair_folders, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: faster on one thread


@pytest.fixture(scope="module")
def trainer(tiny_base, metric_weights):
    return OSEDiffTrainer(tiny_base, lpips_weights=metric_weights)


def test_vsd_gradient_direction_and_weighting():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    x0_regularizer = torch.randn(2, 4, 8, 8, generator=generator)
    x0_frozen = torch.randn(2, 4, 8, 8, generator=generator)
    vsd_loss(x0, x0_regularizer, x0_frozen).backward()
    weight = (x0.detach() - x0_frozen).abs().mean(dim=(1, 2, 3), keepdim=True)  # one weight per sample
    expected = 2 / x0.numel() * (x0_regularizer - x0_frozen) / weight
    torch.testing.assert_close(x0.grad, expected, rtol=1e-5, atol=1e-7)
    # Descent moves x0 from the regularizer's estimate (the generator's own distribution) toward the
    # frozen model's, sample by sample.
    assert ((-x0.grad) * (x0_frozen - x0_regularizer)).sum(dim=(1, 2, 3)).gt(0).all()


def test_noise_and_x0_formulas_are_inverse():
    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    alpha_bar = alpha_bar_at(alphas, t, x0)
    assert alpha_bar.shape == (3, 1, 1, 1) and alpha_bar[2].item() == alphas[999].item()
    noisy = q_sample(x0, noise, alpha_bar)
    torch.testing.assert_close(x0_from_eps(noisy, noise, alpha_bar), x0, rtol=1e-4, atol=1e-4)


def test_regularizer_unet_is_the_base_with_all_adapters_active(trainer, tiny_base):
    from diffsr.backbone import load_backbone
    from diffsr.methods.osediff import UNET_ADAPTERS
    from diffsr.training.osediff import adapters_off

    assert sorted(trainer.regularizer_unet.active_adapters()) == sorted(UNET_ADAPTERS)  # the release: only the last on
    unet = copy.deepcopy(trainer.regularizer_unet)  # given trained-looking LoRA below: the shared trainer stays as it is
    base_unet = load_backbone(tiny_base).unet
    latent, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # as after some training
        with adapters_off(unet):
            frozen = unet(latent, 500, text).sample
        adapted = unet(latent, 500, text).sample
        reference = base_unet(latent, 500, text).sample
    torch.testing.assert_close(frozen, reference, rtol=0, atol=1e-6)  # the teacher: the base, untouched
    assert (adapted - reference).abs().max() > 1e-3
    assert unet.active_adapters() and all(layer.disable_adapters is False for layer in _lora_layers(unet))


def test_vsd_teacher_is_the_base_unet_guided_by_the_negative_prompt(trainer):
    """train_osediff.py's teacher: eps = neg + cfg_vsd * (pos - neg) of the frozen base, at the VSD timestep."""
    from diffsr.training.osediff import VSD_TIMESTEPS, adapters_off

    generator = torch.Generator().manual_seed(0)
    x0, text, negative = (torch.randn(shape, generator=generator) for shape in ((2, 4, 8, 8), (2, 77, 32), (2, 77, 32)))
    torch.manual_seed(3)
    loss = trainer.vsd(x0, text, negative)
    torch.manual_seed(3)  # the same timesteps and noise, by hand
    t = torch.randint(*VSD_TIMESTEPS, (2,))
    alpha_bar = alpha_bar_at(trainer.alphas_cumprod, t, x0)
    noisy = q_sample(x0, torch.randn_like(x0), alpha_bar)
    unet = trainer.regularizer_unet
    with torch.no_grad():
        x0_regularizer = x0_from_eps(noisy, unet(noisy, t, text).sample, alpha_bar)
        with adapters_off(unet):
            positive, negative_eps = unet(noisy, t, text).sample, unet(noisy, t, negative).sample
    guided = negative_eps + trainer.cfg_vsd * (positive - negative_eps)
    expected = vsd_loss(x0, x0_regularizer, x0_from_eps(noisy, guided, alpha_bar))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    unguided = vsd_loss(x0, x0_regularizer, x0_from_eps(noisy, positive, alpha_bar))
    assert (loss - unguided).abs() > 1e-3 * unguided.abs()  # the guidance is really in the loss


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_loss_falls_and_release_loads(tmp_path, tiny_base, metric_weights):
    lr_dir, hr_dir = pair_folders(tmp_path / "pairs", count=1)
    config = tiny_config(tmp_path / "run", "osediff", tiny_base,
                         data={"lr_dir": str(lr_dir), "hr_dir": str(hr_dir), "crop": 64, "flip": False},
                         method_args={"lpips_weights": str(metric_weights)}, train={"steps": 24},
                         optimizers={"generator": {"lr": 3e-3}, "regularizer": {"lr": 3e-3}})
    result = train(config, progress=False)
    rows = logged(tmp_path / "run")
    # The image MSE; LPIPS runs on synthetic random weights here, so its value carries no meaning.
    first, last = falls([row["loss_mse"] for row in rows])
    print(f"OSEDiff image MSE: first 5 steps {first:.4f}, last 5 {last:.4f}")
    assert last < 0.8 * first
    first, last = falls([row["loss_regularizer"] for row in rows], window=8)
    print(f"regularizer eps loss: first 8 steps {first:.4f}, last 8 {last:.4f}")
    assert last < first
    # The release file loads in diffsr's own upscaler and gives the trained model's output.
    (weights,) = result["release"]
    loaded = diffsr.load_upscaler("osediff", base=tiny_base, weights=weights, tagger=None)  # as the trainer's
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = result["trainer"].upscaler().restore(lr, torch.Generator().manual_seed(0))
        got = loaded.restore(lr, generator)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.fixture()
def no_metric_weights(tmp_path, monkeypatch):
    """Nowhere to find LPIPS weights, and no network: an empty weights folder and an empty torch.hub cache."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("DIFFSR_METRIC_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_missing_lpips_weights_say_how_training_names_them(tiny_base, no_metric_weights):
    from diffsr.errors import WeightsError

    with pytest.raises(WeightsError) as error:
        OSEDiffTrainer(tiny_base)
    message = str(error.value)
    assert "LPIPS training loss needs its weights" in message and "--set method_args.lpips_weights=DIR" in message
    assert "lambda_lpips: 0" in message and "--metric-weights" not in message  # `train` has no such flag


@pytest.mark.slow  # two training steps: about 10 s
def test_tiny_config_trains_offline_from_any_folder(tmp_path, tiny_base, no_metric_weights, monkeypatch):
    """configs/train/tiny/osediff.yaml as its comment says: the base `diffsr demo` writes under ~/.cache, no LPIPS
    weights anywhere, run from another working directory."""
    from pathlib import Path

    from diffsr.cli import main
    from training_helpers import hr_folder

    config = Path(__file__).parents[1] / "configs" / "train" / "tiny" / "osediff.yaml"
    home = tmp_path / "home"
    (home / ".cache" / "diffsr" / "tiny").mkdir(parents=True)
    (home / ".cache" / "diffsr" / "tiny" / "sd21-tiny").symlink_to(tiny_base)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    hr = hr_folder(tmp_path / "hr", count=1)
    assert main(["train", str(config), "--set", f"data.hr=[{hr}]", "--set", "train.steps=2", "--quiet"]) == 0
    assert [line["step"] for line in logged(tmp_path / "runs" / "tiny-osediff")] == [1, 2]
