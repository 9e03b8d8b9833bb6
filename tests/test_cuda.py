"""The CUDA paths: every method on the GPU against the CPU (float32), half precision, tiling, a training step.

Skipped where there is no CUDA device (CI has none); run on a GPU machine with
    python -m pytest -q tests/test_cuda.py
TF32 is switched off here so that float32 means float32 on both devices.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import diffsr
from conftest import smooth_image
from diffsr import tiling

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Per method: the weights file name and restore() knobs that keep the tiny runs short.
METHODS = {
    "osediff": ("osediff.pkl", {}),
    "s3diff": ("s3diff/s3diff.pkl", {"degradation": (0.3, 0.2)}),
    "stablesr": ("stablesr_000117.ckpt", {"steps": 4}),
    "ccsr-v2": ("ccsr-v2", {"steps": 4, "sample_posterior": True}),
    "ccsr-v1": ("real-world_ccsr.ckpt", {"steps": 4}),
}


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def weights(tiny_base):
    from diffsr.testing import make_tiny_weights

    return {name: make_tiny_weights(name.split("-")[0], tiny_base, tiny_base.parent / file)
            for name, (file, _) in METHODS.items()}


def load(name, tiny_base, weights, device="cuda", dtype=torch.float32):
    return diffsr.load_upscaler(name.split("-")[0], base=tiny_base, weights=weights[name], device=device, dtype=dtype)


def lr_image(size=64, seed=0):
    return torch.from_numpy(smooth_image(size, size, seed)).permute(2, 0, 1)[None].float() / 255


@torch.no_grad()
def restore(upscaler, lr, **knobs):
    return upscaler.restore(lr.to(upscaler.device), torch.Generator().manual_seed(0), **knobs).float().cpu()


@pytest.mark.parametrize("name", METHODS)
def test_cuda_float32_equals_cpu(name, tiny_base, weights):
    """Same weights, input and seed: the GPU gives the CPU's picture (the noise is drawn on the CPU)."""
    knobs = METHODS[name][1]
    on_cpu = restore(load(name, tiny_base, weights, "cpu"), lr_image(), **knobs)
    on_gpu = restore(load(name, tiny_base, weights), lr_image(), **knobs)
    difference = (on_cpu - on_gpu).abs().max().item()
    print(f"{name}: CUDA float32 vs CPU max abs {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", METHODS)
def test_half_precision_on_cuda(name, dtype, tiny_base, weights):
    """Half precision runs on the GPU and stays near float32. StableSR takes one step here: its random tiny
    UNet's rounding grows chaotically over DDPM steps (x0 = (x - sqrt(1 - a) eps) / sqrt(a) multiplies eps
    errors by ~15 at t = 999), to 0.07 mean abs after 4 steps in bf16 on the CPU as well."""
    knobs = {**METHODS[name][1], **({"steps": 1} if name == "stablesr" else {})}
    full = restore(load(name, tiny_base, weights), lr_image(), **knobs)
    half = restore(load(name, tiny_base, weights, dtype=dtype), lr_image(), **knobs)
    assert torch.isfinite(half).all()
    difference = (full - half).abs().mean().item()
    print(f"{name}: CUDA {dtype} vs float32 mean abs {difference:.2e}")
    assert difference < (0.02 if dtype == torch.float16 else 0.05)


@pytest.mark.parametrize("name", ["osediff", "s3diff"])
def test_the_cuda_default_is_float16_near_float32(name, tiny_base, weights):
    """dtype "auto" (the default) on CUDA: float16, within test_half_precision_on_cuda's float16 tolerance."""
    knobs = METHODS[name][1]
    default = diffsr.load_upscaler(name, base=tiny_base, weights=weights[name], device="cuda")
    assert default.dtype == torch.float16
    half = restore(default, lr_image(), **knobs)
    full = restore(load(name, tiny_base, weights), lr_image(), **knobs)
    assert torch.isfinite(half).all()
    assert (full - half).abs().mean().item() < 0.02


@pytest.mark.parametrize("name, mode", [("osediff", "reduce-overhead"), ("s3diff", "default")])
def test_compiled_on_cuda_stays_within_the_float16_tolerance(name, mode, tiny_base, weights):
    """load_upscaler(compile=...) on the float16 default: within test_half_precision_on_cuda's float16 tolerance
    of float32, every run (reduce-overhead records CUDA graphs after its first runs, then replays them)."""
    knobs = METHODS[name][1]
    full = restore(load(name, tiny_base, weights), lr_image(), **knobs)
    fast = diffsr.load_upscaler(name, base=tiny_base, weights=weights[name], device="cuda", compile=mode)
    runs = [restore(fast, lr_image(), **knobs) for _ in range(4)]
    for run in runs:
        assert torch.isfinite(run).all()
        assert (full - run).abs().mean().item() < 0.02
    assert (runs[1] - runs[-1]).abs().max().item() < 1e-3  # the replays give what the compiled code gave


def test_upscale_on_cuda_writes_the_same_picture_as_on_cpu(tiny_base, weights):
    image = smooth_image(40, 48, seed=3)
    on_cpu = np.asarray(load("stablesr", tiny_base, weights, "cpu")(image, scale=4, steps=4), dtype=np.int16)
    on_gpu = np.asarray(load("stablesr", tiny_base, weights)(image, scale=4, steps=4), dtype=np.int16)
    assert on_cpu.shape == on_gpu.shape
    assert np.abs(on_cpu - on_gpu).max() <= 1  # uint8 rounding of values equal to ~1e-5


@pytest.mark.parametrize("mode", ["exact", "bounded"])  # maps on the GPU, then in host RAM
def test_tiled_vae_on_cuda(mode, tiny_base, weights):
    vae = load("osediff", tiny_base, weights).backbone.vae
    image = (lr_image(96, seed=1) * 2 - 1).cuda()
    options = tiling.TilingOptions(vae_tile_size=8)
    untiled = vae.encode(image).latent_dist.mean
    tiled = tiling.vae_encode(vae, image, options, mode=mode).mean
    assert tiled.device.type == "cuda"
    decoded, decoded_tiled = vae.decode(untiled).sample, tiling.vae_decode(vae, untiled, options, mode=mode)
    assert decoded_tiled.device.type == "cuda"
    assert (tiled - untiled).abs().max().item() < 1e-3
    assert (decoded_tiled - decoded).abs().max().item() < 1e-3


def test_tiled_denoising_on_cuda_equals_cpu(tiny_base, weights):
    options = tiling.TilingOptions(tile_size=8, tile_overlap=0, tile_batch=3, vae_tile_size=8)
    on_cpu = restore(load("osediff", tiny_base, weights, "cpu"), lr_image(96), tiling=options)
    on_gpu = restore(load("osediff", tiny_base, weights), lr_image(96), tiling=options)
    assert (on_cpu - on_gpu).abs().max().item() < 1e-4


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_steps_on_cuda(precision, tmp_path, tiny_base):
    """Mixed precision on the GPU (fp16 goes through the gradient scaler), a checkpoint and a resume."""
    from metric_helpers import FIXTURES  # noqa: F401  (puts the synthetic LPIPS writer on the path)
    import synthetic

    from diffsr.training.loop import train
    from training_helpers import hr_folder, tiny_config

    lpips = tmp_path / "lpips"
    lpips.mkdir()
    synthetic.write_diffsr_weight_files(lpips)
    hr = hr_folder(tmp_path / "hr", count=3)

    def config(steps):
        return tiny_config(tmp_path / "run", "osediff", tiny_base, data={"hr": [str(hr)], "crop": 64},
                           method_args={"lpips_weights": str(lpips)},
                           optimizers={"generator": {"lr": 1e-3}, "regularizer": {"lr": 1e-3}},
                           train={"steps": steps, "save_every": 2, "mixed_precision": precision,
                                  "gradient_checkpointing": True})

    first = train(config(2), progress=False)
    assert next(first["trainer"].parameters()).device.type == "cuda"
    resumed = train(config(4), progress=False)
    losses = resumed["losses"]["loss"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert resumed["release"] and all(Path(file).is_file() for file in resumed["release"])
