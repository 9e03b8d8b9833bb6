"""Load the reference degradation code (BasicSR + Real-ESRGAN files, not part of this repository) by path.

The folder given holds degradations.py, img_process_util.py, diffjpeg.py (BasicSR 8d56e3a0) and
realesrgan_model.py (Real-ESRGAN a4abfb29). What they import but the degradation does not use (registries,
the GAN base class, the pair crop, torchvision's grayscale) is replaced by stand-ins, so neither basicsr
nor torchvision needs to be installed. Used by benchmarks/bench_degradation.py and
tests/fixtures/degradation/make_fixtures.py.
"""

import importlib.util
import sys
import types
from pathlib import Path

import torch


def _load(name: str, folder: Path):
    spec = importlib.util.spec_from_file_location(name, folder / f"{name.rsplit('.', 1)[-1]}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_reference(folder: Path) -> types.SimpleNamespace:
    """The modules: .degradations, .process (img_process_util), .diffjpeg, .model (realesrgan_model)."""
    def gray(img, num_output_channels=1):  # torchvision.transforms.functional.rgb_to_grayscale, tensor path
        r, g, b = img.unbind(dim=-3)
        out = (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(dim=-3)
        return out.expand(img.shape) if num_output_channels == 3 else out

    stubs = {"torchvision": {}, "torchvision.transforms": {}, "torchvision.transforms.functional": {"rgb_to_grayscale": gray},
             "basicsr": {}, "basicsr.data": {}, "basicsr.utils": {},
             "basicsr.data.transforms": {"paired_random_crop": lambda gts, lq, size, scale: (gts, lq)},
             "basicsr.models": {}, "basicsr.models.srgan_model": {"SRGANModel": object},
             "basicsr.utils.registry": {"MODEL_REGISTRY": types.SimpleNamespace(register=lambda: (lambda c: c))}}
    for name, attrs in stubs.items():
        sys.modules[name] = types.SimpleNamespace(**attrs)
    degradations = _load("basicsr.data.degradations", folder)
    process = _load("basicsr.utils.img_process_util", folder)
    diffjpeg = _load("basicsr.utils.diffjpeg", folder)
    sys.modules["basicsr.utils"].DiffJPEG = diffjpeg.DiffJPEG
    sys.modules["basicsr.utils"].USMSharp = process.USMSharp
    model_module = _load("realesrgan_model", folder)
    return types.SimpleNamespace(degradations=degradations, process=process, diffjpeg=diffjpeg, model=model_module)


def make_model(reference: types.SimpleNamespace, opt: dict, sharpen: bool = True):
    """A RealESRGANModel that runs only `feed_data` (the degradation), on the CPU, without the pair pool."""
    model_class = reference.model.RealESRGANModel
    model = model_class.__new__(model_class)
    model.opt, model.device, model.is_train = opt, torch.device("cpu"), True
    model.jpeger = reference.diffjpeg.DiffJPEG(differentiable=False)
    model.usm_sharpener = reference.process.USMSharp() if sharpen else (lambda x: x)
    model._dequeue_and_enqueue = lambda: None  # the pool only reorders samples across batches
    return model
