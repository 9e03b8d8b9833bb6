"""OSEDiff: one UNet step at t=999 on SD 2.1-base, with LoRA on the VAE encoder and the UNet.

Release: cswry/OSEDiff (`osediff.pkl`). Facts: ../shared/METHODS.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffsr.backbone import Backbone, load_backbone
from diffsr.checkpoints import read_method_weights
from diffsr.errors import UsageError, WeightsError
from diffsr.images import Picture, resize
from diffsr import lora
from diffsr.lora import add_lora, load_lora_state
from diffsr.methods.base import Prepared, Upscaler, output_size
from diffsr.prompts import compose_prompt, load_tagger
from diffsr.samplers import x0_from_eps
from diffsr.tiling import TilingOptions, vae_decode, vae_encode

TIMESTEP = 999
TILE_SIZE = 96  # latent px, the release's default (overlap 32)
PROCESS_SIZE = 512  # the release enlarges inputs whose short side is below PROCESS_SIZE // scale
UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"
_UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                  "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
_VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def unet_lora_modules(unet: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """The release's three UNet target lists: (down blocks + conv_in, up blocks + conv_out, the rest)."""
    encoder, decoder, others = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in _UNET_PATTERNS):
            continue
        module = name.replace(".weight", "")
        if "down_blocks" in name or "conv_in" in name:
            encoder.append(module)
        elif "up_blocks" in name or "conv_out" in name:
            decoder.append(module)
        else:
            others.append(module)
    return encoder, decoder, others


def vae_lora_modules(vae: torch.nn.Module) -> list[str]:
    """The release's VAE-encoder target list. It appends a name once per matching pattern, so names
    repeat; kept as released because the list is stored in osediff.pkl."""
    modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in _VAE_PATTERNS:
            if pattern in name and "encoder" in name:
                modules.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                modules.append(name.replace(".weight", ""))
    return modules


def attach_lora(backbone: Backbone, weights: dict) -> None:
    """Add the release's peft adapters (alpha 8 => scaling 8/rank) and copy the trained tensors in."""
    unet_lists = [weights[f"unet_lora_{part}_modules"] for part in ("encoder", "decoder", "others")]
    for adapter, modules in zip(UNET_ADAPTERS, unet_lists):
        add_lora(backbone.unet, modules, weights["rank_unet"], adapter)
    add_lora(backbone.vae, weights["vae_lora_encoder_modules"], weights["rank_vae"], VAE_ADAPTER)
    # conv_in is LoRA-wrapped AND its base weight was trained: the state holds both.
    load_lora_state(backbone.unet, weights["state_dict_unet"], lambda n: "lora" in n or "conv_in" in n, "state_dict_unet")
    load_lora_state(backbone.vae, weights["state_dict_vae"], lambda n: "lora" in n, "state_dict_vae")
    backbone.unet.set_adapter(list(UNET_ADAPTERS))
    backbone.vae.set_adapter([VAE_ADAPTER])


def add_release_adapters(backbone: Backbone, rank: int) -> tuple[tuple[list[str], ...], list[str]]:
    """Fresh adapters as train_osediff.py makes them (all active); returns the target lists it stores."""
    unet_lists = unet_lora_modules(backbone.unet)
    vae_list = vae_lora_modules(backbone.vae)
    for adapter, modules in zip(UNET_ADAPTERS, unet_lists):
        add_lora(backbone.unet, modules, rank, adapter)
    add_lora(backbone.vae, vae_list, rank, VAE_ADAPTER)
    backbone.unet.set_adapter(list(UNET_ADAPTERS))
    backbone.vae.set_adapter([VAE_ADAPTER])
    return unet_lists, vae_list


def release_state(backbone: Backbone, unet_lists, vae_list: list[str], rank: int) -> dict:
    """osediff.pkl's contents for a backbone carrying the release's adapters (what train_osediff.py saves)."""
    return {
        "vae_lora_encoder_modules": vae_list,
        "unet_lora_encoder_modules": unet_lists[0],
        "unet_lora_decoder_modules": unet_lists[1],
        "unet_lora_others_modules": unet_lists[2],
        "rank_unet": rank,
        "rank_vae": rank,
        "state_dict_unet": {k: v.detach().cpu().float().clone() for k, v in backbone.unet.state_dict().items()
                            if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v.detach().cpu().float().clone() for k, v in backbone.vae.state_dict().items()
                           if "lora" in k},
    }


class OSEDiff(Upscaler):
    name = "osediff"
    default_base = "sd21-base"
    default_color_fix = "adain"
    weights_name = "osediff.pkl"

    def __init__(self, backbone: Backbone, tagger=None, sample_posterior: bool = False,
                 process_size: int = PROCESS_SIZE):
        super().__init__(backbone.device, backbone.dtype)
        self.backbone = backbone
        self.process_size = process_size
        self.tagger = tagger
        self.sample_posterior = sample_posterior
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
        state = read_method_weights(weights, cls.name)
        backbone = load_backbone(base, device, dtype)
        try:
            attach_lora(backbone, state)
        except WeightsError as error:
            raise WeightsError(f"{weights}: {error}") from None
        if merge_lora:
            lora.merge_lora(backbone.unet)
            lora.merge_lora(backbone.vae)
        tagger = load_tagger(tagger, device if tagger_device is None else tagger_device, dtype, beside=weights,
                             ram_weights=ram_weights, dape_weights=dape_weights)
        return cls(backbone, tagger=tagger, sample_posterior=sample_posterior, process_size=process_size)

    @classmethod
    def unused_extras(cls, options: dict) -> frozenset:
        tagger = options.get("tagger", "dape")
        if tagger == "ram":
            return frozenset({"dape_weights"})
        return frozenset() if tagger == "dape" else frozenset({"ram_weights", "dape_weights"})

    @classmethod
    def write_random_weights(cls, base: Path, out_file: Path, seed: int = 0) -> None:
        """A random osediff.pkl with the release's keys, lists, ranks and adapter names."""
        backbone = load_backbone(base)
        rank = 4
        unet_lists, vae_list = add_release_adapters(backbone, rank)
        generator = torch.Generator().manual_seed(seed)
        release = release_state(backbone, unet_lists, vae_list, rank)
        for state in (release["state_dict_unet"], release["state_dict_vae"]):
            for key, value in state.items():
                # lora_B starts at zero in training; random here so the adapters visibly act.
                noise = torch.randn(value.shape, generator=generator) * (0.02 if "lora" in key else 0.01)
                state[key] = (value + noise).contiguous() if "base_layer" in key else noise
        torch.save(release, out_file)

    @classmethod
    def knob_names(cls):
        return ("prompt", "sample_posterior", "on_prompt")

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

    def restore(self, lr: torch.Tensor, generator: torch.Generator, tiling: TilingOptions = TilingOptions(),
                prompt: str = "", sample_posterior: bool | None = None, on_prompt=None) -> torch.Tensor:
        """`on_prompt`, if given, is called with the prompt used (tags and `prompt`), e.g. to show or save it."""
        backbone = self.backbone
        vae, unet = backbone.vae, backbone.unet
        sample = self.sample_posterior if sample_posterior is None else sample_posterior
        full_prompt = self.prompt_for(lr, prompt)
        if on_prompt is not None:
            on_prompt(full_prompt)
        text = backbone.encode_prompt([full_prompt])
        posterior = vae_encode(vae, (lr * 2 - 1).to(self.dtype), tiling)
        latent = (posterior.sample(generator) if sample else posterior.mode()) * vae.config.scaling_factor

        def denoise(tiles, _condition):
            return unet(tiles, TIMESTEP, encoder_hidden_states=text.expand(len(tiles), -1, -1)).sample

        eps = tiling.aggregate(denoise, latent, None, TILE_SIZE, unet)
        # One step from t=999 straight to x0 (what the release's DDPM step returns there).
        x0 = x0_from_eps(latent.float(), eps.float(), self.alpha_bar)
        image = vae_decode(vae, (x0 / vae.config.scaling_factor).to(self.dtype), tiling).clamp(-1, 1)
        return image.float().mul_(0.5).add_(0.5)
