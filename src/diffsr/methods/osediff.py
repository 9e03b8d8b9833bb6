"""OSEDiff: one UNet step at t=999 on SD 2.1-base, with LoRA on the VAE encoder and the UNet.

Release: cswry/OSEDiff (`osediff.pkl`, read by diffsr.checkpoints.osediff). Facts: ../shared/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffsr.backbone import Backbone, load_backbone
from diffsr.checkpoints import osediff as checkpoint
from diffsr.checkpoints.osediff import UNET_ADAPTERS, VAE_ADAPTER, Parts, Targets
from diffsr.errors import UsageError, WeightsError
from diffsr.images import Picture, resize
from diffsr.knobs import Knobs, knob
from diffsr import lora
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.prompts import compose_prompt, load_tagger
from diffsr.samplers import one_step
from diffsr.tiling import TilingOptions, vae_decode, vae_encode

TIMESTEP = 999
TILE_SIZE = 96  # latent px, the release's default (overlap 32)
PROCESS_SIZE = 512  # the release enlarges inputs whose short side is below PROCESS_SIZE // scale


def add_adapters(backbone: Backbone, targets: Targets) -> None:
    """The release's peft adapters at `targets`, all active (fresh: as train_osediff.py starts)."""
    for adapter, modules in zip(UNET_ADAPTERS, targets.unet):
        lora.add_lora(backbone.unet, modules, targets.rank_unet, adapter)
    lora.add_lora(backbone.vae, targets.vae, targets.rank_vae, VAE_ADAPTER)
    backbone.unet.set_adapter(list(UNET_ADAPTERS))
    backbone.vae.set_adapter([VAE_ADAPTER])


def fresh_adapters(backbone: Backbone, rank: int) -> Targets:
    """Untrained adapters of `rank` at the release's targets, as train_osediff.py starts; returns the targets."""
    targets = Targets.release(backbone.unet, backbone.vae, rank)
    add_adapters(backbone, targets)
    return targets


def attach(backbone: Backbone, parts: Parts) -> None:
    """The release's adapters with its trained tensors copied in."""
    add_adapters(backbone, parts.targets)
    lora.load_lora_state(backbone.unet, parts.unet_state, checkpoint.is_unet_tensor, "state_dict_unet")
    lora.load_lora_state(backbone.vae, parts.vae_state, checkpoint.is_vae_tensor, "state_dict_vae")


@dataclass(frozen=True)
class OSEDiffKnobs(Knobs):
    """OSEDiff's per-call knobs (test_osediff.py's --prompt; the rest are diffsr's)."""

    prompt: str = knob("", "text after the tags the tagger reads from the image (the release's --prompt)")
    sample_posterior: bool | None = knob(None, "draw the VAE posterior with the seed instead of taking its mode "
                                               "(default: as loaded; the release takes the mode)", kind=bool)
    on_prompt: Callable[[str], None] | None = knob(None, "called with each image's prompt (tags, then prompt), "
                                                         "e.g. to show or save it")


class OSEDiff(Upscaler):
    name = "osediff"
    default_base = "sd21-base"
    default_color_fix = "adain"
    weights_name = "osediff.pkl"
    Knobs = OSEDiffKnobs

    def __init__(self, backbone: Backbone, tagger=None, sample_posterior: bool = False,
                 process_size: int = PROCESS_SIZE, targets: Targets | None = None):
        """`backbone` carries the release's adapters at `targets` (what `release_parts` saves)."""
        self.backbone = backbone
        self.process_size = process_size
        self.tagger = tagger
        self.sample_posterior = sample_posterior
        self.targets = targets
        self.alpha_bar = backbone.alphas_cumprod[TIMESTEP].item()

    @classmethod
    def load(cls, base, weights, device="cpu", dtype="float32", merge_lora: bool = True, tagger="dape",
             tagger_device=None, ram_weights=None, dape_weights=None, sample_posterior: bool = False,
             process_size: int = PROCESS_SIZE) -> "OSEDiff":
        """`merge_lora` (default True) folds the LoRA into the base weights: the same output within float error,
        and faster (benchmarks/results/speed_vs_release.md); False keeps the adapters apart.
        `tagger`: "dape" (the release's: RAM + DAPE from `ram_weights` and `dape_weights`, by default
        ram_swin_large_14m.pth and DAPE.pth beside `weights` or in the weights cache), "ram", "none"/None, or a
        callable images -> tag strings. It runs on `tagger_device` (default `device`) in `dtype`, once per image."""
        if weights is None:
            raise UsageError("osediff needs its weights: pass weights='osediff.pkl' (--weights)")
        parts = checkpoint.read(weights)
        backbone = load_backbone(base, device, dtype)
        try:
            attach(backbone, parts)
        except WeightsError as error:
            raise WeightsError(f"{weights}: {error}") from None
        if merge_lora:
            lora.merge_lora(backbone.unet)
            lora.merge_lora(backbone.vae)
        tagger = load_tagger(tagger, device if tagger_device is None else tagger_device, dtype, beside=weights,
                             ram_weights=ram_weights, dape_weights=dape_weights)
        return cls(backbone, tagger, sample_posterior, process_size, parts.targets)

    def release_parts(self) -> Parts:
        """What osediff.pkl holds for this model now (checkpoint.write saves it)."""
        if self.targets is None:
            raise UsageError("this OSEDiff was built without its adapters' targets: nothing to save")
        return checkpoint.parts_of(self.backbone.unet, self.backbone.vae, self.targets)

    @classmethod
    def unused_extras(cls, options: dict) -> frozenset:
        tagger = options.get("tagger", "dape")
        if tagger == "ram":
            return frozenset({"dape_weights"})
        return frozenset() if tagger == "dape" else frozenset({"ram_weights", "dape_weights"})

    def knob_defaults(self) -> dict:
        return {"sample_posterior": self.sample_posterior}  # the load option

    def preprocess(self, picture: Picture, scale: float) -> Prepared:
        """As test_osediff.py: enlarge small inputs, resize by `scale` (bicubic), then to a multiple of 8
        (Lanczos), all in PIL on the 8-bit image."""
        rgb = picture.rgb
        width, height = picture.size
        short_side = self.process_size // scale
        if width < short_side or height < short_side:
            grow = short_side / min(width, height)
            width, height = int(grow * width), int(grow * height)
            rgb = resize(rgb, (width, height), "bicubic")
        width, height = round(width * scale), round(height * scale)
        rgb = resize(rgb, (width, height), "bicubic")
        rgb = resize(rgb, (width - width % 8, height - height % 8), "lanczos")
        # The release meant to resize the output back to scale x input but discarded the result of
        # that resize; we do resize back, so the output has the size the user asked for.
        return Prepared(Picture(rgb).to_tensor(), output_size(picture, scale))

    def prompt_for(self, lr: torch.Tensor, prompt: str) -> str:
        tags = self.tagger(lr)[0] if self.tagger is not None else None
        return compose_prompt(prompt, tags)

    def one_step(self, image: torch.Tensor, text: torch.Tensor, draw: Callable, tiling: TilingOptions | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """THE core, differentiable, that inference and the trainer's generator run: image in [-1, 1] -> (x0 latent,
        decoded image in [-1, 1]). `text`: prompt embeddings (1 or B rows); `draw(posterior)`: the latent taken
        (its mode, or a sample). `tiling` None: whole tensors with gradients (training batches)."""
        vae, unet = self.backbone.vae, self.backbone.unet
        mode = "untiled" if tiling is None else None
        tiling = tiling or TilingOptions()

        def denoise(tiles, _condition=None):
            return unet(tiles, TIMESTEP, encoder_hidden_states=text.expand(len(tiles), -1, -1)).sample

        def eps_at(latent):
            return denoise(latent) if mode else tiling.aggregate(denoise, latent, None, TILE_SIZE, unet)

        return one_step(image.to(self.dtype), lambda x: draw(vae_encode(vae, x, tiling, mode)), eps_at,
                        lambda x0: vae_decode(vae, x0.to(self.dtype), tiling, mode), self.alpha_bar,
                        vae.config.scaling_factor)

    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                **given) -> torch.Tensor:
        """`given`: the knobs (OSEDiffKnobs), checked here once."""
        knobs = self.settings(given)
        prompt = self.prompt_for(lr, knobs.prompt)
        if knobs.on_prompt is not None:
            knobs.on_prompt(prompt)
        text = self.backbone.encode_prompt([prompt])
        if knobs.sample_posterior:
            draw = lambda posterior: posterior.sample(generator)  # noqa: E731
        else:
            draw = lambda posterior: posterior.mode()  # noqa: E731
        _, image = self.one_step(lr * 2 - 1, text, draw, tiling)
        return image.float().mul_(0.5).add_(0.5)
