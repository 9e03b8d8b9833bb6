"""The shared Stable Diffusion backbone: load its parts from a hub id or a diffusers-layout folder."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffsr.errors import BaseModelError, UsageError, first_line

PROMPT_CACHE_SIZE = 8  # encode_prompt results kept (each 77 x 1024 values per prompt)

# What each part's folder must hold to be loadable.
_PART_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}
PARTS = tuple(_PART_FILES)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype; "auto" is the fastest measured one for `device`: float16 on CUDA (the releases' GPU
    setting; a float16 VAE pass that overflows is redone in float32, diffsr.tiling.vae), float32 elsewhere (on
    the CPU it runs convolutions by Winograd and was the fastest: benchmarks/results/speed_vs_release.md)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPE_CHOICES)})")
    return DTYPES[dtype]


# torch.compile's modes (load_upscaler(compile=...)): reduce-overhead adds CUDA graphs on a GPU
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode) -> None:
    if mode not in COMPILE_MODES:
        raise UsageError(f"unknown compile mode {mode!r} (choose {', '.join(COMPILE_MODES)})")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine, or one clear error line."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device '{device}' (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{device}' is not available: this torch has no CUDA or there is no GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) found")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{device}' is not available on this machine")
    return device


def check_base_folder(base: Path, parts=PARTS) -> None:
    """Name the first missing part of a local base folder, instead of a deep stack trace later."""
    if not base.is_dir():
        raise BaseModelError(f"{base}: base model folder does not exist")
    for part in parts:
        folder = base / part
        if not folder.is_dir():
            raise BaseModelError(f"{base}: base model folder is missing '{part}/' "
                                 f"(a diffusers Stable Diffusion folder has {', '.join(p + '/' for p in PARTS)})")
        if not any((folder / f).is_file() for f in _PART_FILES[part]):
            raise BaseModelError(f"{folder}: missing {_PART_FILES[part][0]}")


@dataclass
class Backbone:
    """The Stable Diffusion parts every method shares."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    folder: Path | None = None  # the local diffusers folder it was loaded from (a registry name or hub id resolved)
    prompt_cache: dict = field(default_factory=dict, repr=False, compare=False)  # encode_prompt's last results

    # Read from the UNet's weights, never stored: moving or casting the modules (a trainer, accelerate) moves them.
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden states for each prompt, padded to the tokenizer's maximum length (77). The last few
        results are kept: a folder's images mostly share their prompts (S3Diff's two, StableSR's and CCSR's empty
        one), and the full-size text encoder costs about 1 s per prompt on a CPU. A result is kept with the text
        encoder's state (each weight's storage, device, dtype and in-place version), so moved, cast or changed
        weights are encoded again."""
        weights = list(self.text_encoder.parameters())
        if any(weight.is_inference() for weight in weights):  # made under torch.inference_mode: no versions kept
            return self._encode(prompts)
        key = (tuple(prompts), self.dtype, tuple((w.data_ptr(), w.device, w.dtype, w._version) for w in weights))
        embeddings = self.prompt_cache.get(key)
        if embeddings is None:
            embeddings = self.prompt_cache[key] = self._encode(prompts)
            while len(self.prompt_cache) > PROMPT_CACHE_SIZE:
                del self.prompt_cache[next(iter(self.prompt_cache))]  # the oldest
        return embeddings.clone()  # (callers may change theirs in place)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.dtype)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod


@contextmanager
def quiet_loading():
    """Silence the libraries' per-load progress bars and notices; our own progress covers loading."""
    import diffusers
    import transformers

    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def load_backbone(base: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                  vae: torch.nn.Module | None = None) -> Backbone:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config from `base`.

    `base` is a local folder in the diffusers layout, a registry name (sd21-base) or a hub id (both
    fetched by diffsr.weights, the cache only when offline). `vae`: a VAE to use instead of the base's
    (CCSR v2 ships its own), so the base's is not loaded at all.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffsr.weights import resolve

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    base = resolve(base, "base")  # registry names and hub ids become local folders; all downloads live there
    check_base_folder(base)
    base = str(base)
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype)
            vae = vae or AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype)
            text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        from diffusers import DDPMScheduler

        scheduler_config = dict(DDPMScheduler.load_config(base, subfolder="scheduler"))
    except (OSError, ValueError) as error:
        raise BaseModelError(f"{base}: cannot load the base model: {first_line(error)}") from error
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(device=device)
    return Backbone(unet, vae, text_encoder, tokenizer, scheduler_config, Path(base))
