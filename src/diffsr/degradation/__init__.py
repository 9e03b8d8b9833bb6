"""Real-ESRGAN second-order degradation (kernels, noise, JPEG, resize), batched on the compute device."""

from diffsr.degradation.config import DegradationConfig, load_config
from diffsr.degradation.jpeg import jpeg
from diffsr.degradation.kernels import filter2d, make_kernels, usm_sharpen
from diffsr.degradation.noise import add_noise
from diffsr.degradation.pipeline import apply_degradation, degrade_batch, sample_params

__all__ = ["DegradationConfig", "load_config", "jpeg", "filter2d", "make_kernels", "usm_sharpen", "add_noise",
           "apply_degradation", "degrade_batch", "sample_params"]
