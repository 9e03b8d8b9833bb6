"""StableSR's release format: a Lightning .ckpt pair in LDM key names.

The model file (`stablesr_000117.ckpt`, `stablesr_turbo.ckpt`, `stablesr_768v_000139.ckpt`) holds the UNet with its
SFT (`spade`) layers under `model.diffusion_model.`, the time-aware encoder under `structcond_stage_model.`, the
first-stage VAE under `first_stage_model.` and the diffusion schedule's buffers; the CFW file
(`vqgan_cfw_00011.ckpt`) is a bare autoencoder whose decoder has `fusion_layer_*`, plus its training loss's tensors.
`read` gives the parts in the diffusers layout (checkpoints.ldm's key maps); `write` writes them back as the release
does, `write_copy` as the one-time safetensors copy (`unet.*`, `encoder.*`, `vae.*`, `fusion.*`) `read` also takes.

The variants share one architecture and one set of keys, so the registry tells them apart: `release_item` names the
registry item whose release file a path is (or is the safetensors copy of).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffsr.checkpoints import ldm, read_weights
from diffsr.errors import WeightsError

CFW_NAME = "vqgan_cfw_00011.ckpt"
PART_NAMES = ("unet", "encoder", "vae", "fusion")
PREDICTION = {"stablesr-768v": "v_prediction"}  # the registry's variants trained on a v-prediction base
_BARE_VAE = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # the CFW file's top-level names


@dataclass
class Parts:
    """What a StableSR file holds, in diffusers names; a part the file lacks is empty.

    unet: UNet2DConditionModel keys with `.sft.` layers; encoder (+ encoder_config): TimeAwareEncoder; vae:
    AutoencoderKL; fusion: CFWAutoencoder.fusion. alphas_cumprod: the model file's schedule (written as the
    LDM buffers); discriminator: the CFW file's loss discriminator (written as `loss.discriminator.*`)."""

    unet: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
    encoder_config: dict | None = None
    vae: dict = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)
    alphas_cumprod: torch.Tensor | None = None
    discriminator: dict = field(default_factory=dict)
    global_step: int = 0


def detect(state_or_path) -> bool:
    """Whether a file (path) or its loaded dict is in StableSR's format, either file of the pair or the copy."""
    from diffsr.checkpoints import detect as detect_method

    raw = read_weights(state_or_path) if isinstance(state_or_path, (str, Path)) else state_or_path
    state = raw.get("state_dict", raw)
    return detect_method(raw) == "stablesr" or (isinstance(state, dict) and _converted(state))


def _converted(state: dict) -> bool:
    return any(isinstance(k, str) and k.startswith(("unet.", "vae.", "fusion.")) for k in state)


def read(path: str | Path, unet_config: dict, vae_config: dict, norm_groups: int) -> Parts:
    """The parts in `path`: the release's .ckpt (either file of the pair) or a copy `write_copy` made."""
    raw = read_weights(path)
    state = raw.get("state_dict", raw)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: 'state_dict' is not a dict of tensors")
    if _converted(state):
        parts = Parts(**{name: ldm.strip_prefix(state, name + ".") for name in PART_NAMES})
        if parts.encoder:
            parts.encoder_config = encoder_config_from_state(parts.encoder, norm_groups)
        return parts
    step = raw.get("global_step")
    parts = Parts(global_step=step if isinstance(step, int) else 0)
    try:
        if ldm.strip_prefix(state, ldm.UNET_PREFIX):
            parts.unet = ldm.unet_from_ldm(state, unet_config)
        encoder_state = ldm.strip_prefix(state, ldm.ENCODER_PREFIX)
        if encoder_state:
            parts.encoder_config = ldm.encoder_config_from_ldm(encoder_state, norm_groups)
            parts.encoder = ldm.encoder_from_ldm(encoder_state, parts.encoder_config)
        # The CFW file is a bare autoencoder; the main file nests one under first_stage_model.
        vae_state = ldm.strip_prefix(state, ldm.VAE_PREFIX) or {k: v for k, v in state.items() if k.startswith(_BARE_VAE)}
        if vae_state:
            parts.vae, parts.fusion = ldm.vae_from_ldm(vae_state, vae_config)
    except (KeyError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{path}: not a StableSR checkpoint this base can hold ({error})") from None
    if "alphas_cumprod" in state:
        parts.alphas_cumprod = state["alphas_cumprod"]
    parts.discriminator = ldm.strip_prefix(state, "loss.discriminator.")
    return parts


def read_model(path: str | Path, unet_config: dict, vae_config: dict, norm_groups: int) -> Parts:
    """`read`, for the model file: refused unless it holds a UNet with SFT layers and the time-aware encoder."""
    parts = read(path, unet_config, vae_config, norm_groups)
    for needed in ("unet", "encoder"):
        if not getattr(parts, needed):
            raise WeightsError(f"{path}: no {needed} weights: not a StableSR model checkpoint "
                               f"(the CFW autoencoder file goes to cfw_weights / --cfw-weights)")
    try:
        sft_shapes(parts.unet)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None
    return parts


def read_cfw(path: str | Path, unet_config: dict, vae_config: dict, norm_groups: int) -> Parts:
    """`read`, for the CFW file: refused unless it holds the fusion layers."""
    parts = read(path, unet_config, vae_config, norm_groups)
    if not parts.fusion:
        raise WeightsError(f"{path}: has no CFW fusion layers (decoder.fusion_layer_*): "
                           f"not a StableSR CFW autoencoder such as {CFW_NAME}")
    return parts


def read_autoencoder(weights: Path, cfw_weights, model: Parts, unet_config: dict, vae_config: dict,
                     norm_groups: int) -> tuple[Parts, Path]:
    """(parts, file) of the autoencoder: the CFW file given or beside the model file (the release trained only its
    fusion layers, so its VAE is the model file's first stage), else the model file's own VAE, with a warning."""
    path = Path(cfw_weights) if cfw_weights else find_cfw(weights)
    if path is None:
        warnings.warn(f"no {CFW_NAME} beside {weights.name} and no cfw_weights given: decoding with the plain "
                      "VAE decoder (fidelity has no effect)", stacklevel=3)
        return model, weights
    return read_cfw(path, unet_config, vae_config, norm_groups), path


def check_prediction(path: Path, item, prediction: str) -> None:
    """Refuse a release variant (a registry Item, or None) on a base that predicts another target (the 768-v model
    on an epsilon base)."""
    needed = PREDICTION.get(item.name, prediction) if item else prediction
    if needed != prediction:
        raise WeightsError(f"{path}: a {needed.replace('_', '-')} checkpoint ({item.name}), but the base model's "
                           f"scheduler predicts '{prediction}': use base {item.base} or prediction_type='{needed}'")


def write(parts: Parts, path: str | Path) -> Path:
    """`parts` as the release's Lightning file: the model file when there is a UNet, else the CFW file."""
    path = Path(path)
    tensors = _tensors(parts)
    levels = 1 + max(int(k.split(".")[2]) for k in tensors["vae"] if k.startswith("encoder.down_blocks."))
    if tensors["unet"]:
        unet = ldm.unet_to_ldm(tensors["unet"], _layers_per_block(tensors["unet"]))
        encoder = ldm.encoder_to_ldm(tensors["encoder"], parts.encoder_config)
        state = {ldm.UNET_PREFIX + k: v for k, v in unet.items()}
        state.update({ldm.ENCODER_PREFIX + k: v for k, v in encoder.items()})
        state.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(tensors["vae"], {}, levels).items()})
        state.update(schedule_buffers(parts.alphas_cumprod))
    else:  # the CFW file, with the training loss's tensors as the release's file has them
        state = ldm.vae_to_ldm(tensors["vae"], tensors["fusion"], levels)
        state["loss.logvar"] = torch.zeros(())
        state.update({f"loss.discriminator.{k}": v for k, v in tensors["discriminator"].items()})
    torch.save({"state_dict": state, "global_step": parts.global_step, "epoch": 0}, path)
    return path


def write_copy(parts: Parts, path: str | Path) -> Path:
    """`parts` as the safetensors copy in diffusers names (`unet.*`, `encoder.*`, `vae.*`, `fusion.*`) that `read`
    also takes: what `diffsr convert` and the registry's one-time conversion write."""
    from safetensors.torch import save_file

    tensors = _tensors(parts)
    save_file({f"{name}.{k}": v for name in PART_NAMES for k, v in tensors[name].items()}, str(path),
              metadata={"format": "pt"})
    return Path(path)


def _tensors(parts: Parts) -> dict[str, dict]:
    return {name: {k: v.detach().float().cpu().contiguous() for k, v in getattr(parts, name).items()}
            for name in (*PART_NAMES, "discriminator")}


def _layers_per_block(unet_state: dict) -> int:
    return 1 + max(int(m.group(1)) for k in unet_state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))


def encoder_config_from_state(state: dict, norm_groups: int, num_heads: int = 4) -> dict:
    """TimeAwareEncoder arguments from its own (converted) tensor shapes."""
    model_channels, in_channels = state["conv_in.weight"].shape[:2]
    maps = sorted({int(k.split(".")[1]) for k in state if k.startswith("fea_tran.")})
    widths = [state[f"fea_tran.{i}.norm1.weight"].shape[0] for i in maps]
    return dict(in_channels=in_channels, model_channels=model_channels,
                out_channels=state["fea_tran.0.conv2.weight"].shape[0],
                channel_mult=tuple(w // model_channels for w in widths),
                num_res_blocks=len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")}),
                attention_levels=tuple(sorted({int(k.split(".")[1]) for k in state
                                               if k.startswith("down_blocks.") and ".attentions." in k})),
                num_heads=num_heads, norm_groups=norm_groups)


def sft_shapes(unet_state: dict) -> tuple[int, int]:
    """(condition channels, hidden width) of the SFT layers in a converted UNet state."""
    weight = next((v for k, v in unet_state.items() if k.endswith(".sft.mlp_shared.0.weight")), None)
    if weight is None:
        raise WeightsError("its UNet has no SFT (spade) layers: a plain Stable Diffusion UNet, not StableSR's")
    return weight.shape[1], weight.shape[0]


def schedule_buffers(alphas_cumprod: torch.Tensor) -> dict:
    """The diffusion-schedule buffers an LDM Lightning checkpoint stores beside the weights."""
    abar = alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    variance = betas * (1 - abar_prev) / (1 - abar)
    buffers = {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
               "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
               "log_one_minus_alphas_cumprod": (1 - abar).log(), "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
               "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(), "posterior_variance": variance,
               "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
               "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
               "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)}
    return {k: v.float() for k, v in buffers.items()}


def find_cfw(weights: Path) -> Path | None:
    """The CFW file beside a model file, as released (.ckpt) or as its safetensors copy."""
    for name in (CFW_NAME, Path(CFW_NAME).with_suffix(".safetensors").name):
        if (weights.parent / name).is_file():
            return weights.parent / name
    return None


def release_item(path: str | Path, registry=None):
    """The registry's StableSR weights Item whose release file `path` is, by the registry's file names (the
    variants cannot be told apart by their tensors); None for a file the registry does not list."""
    from diffsr.weights.registry import Registry

    stem = Path(path).stem  # the release .ckpt or its safetensors copy (same stem)
    for item in (registry or Registry.load()).for_method("stablesr"):
        if item.kind == "weights" and any(Path(spec.path).stem == stem for spec in item.files):
            return item
    return None


def load_into(module: torch.nn.Module, state: dict, path, what: str) -> None:
    """Load every tensor of `module` from `state`, with one line naming the file and the first problem."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise WeightsError(f"{path}: the {what} lacks '{missing[0]}' ({len(missing)} tensors missing)")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise WeightsError(f"{path}: {what} tensor '{key}' has shape {tuple(state[key].shape)}, the base model "
                               f"needs {tuple(value.shape)} (weights made for another base?)")
    module.load_state_dict({k: state[k] for k in own})


def base_configs(base: str | Path) -> tuple[dict, dict]:
    """(UNet config, VAE config) of a diffusers base folder: what `read` needs, without loading the base."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffsr.backbone import quiet_loading
    from diffsr.errors import BaseModelError

    try:
        with quiet_loading():
            return (UNet2DConditionModel.load_config(str(base), subfolder="unet"),
                    AutoencoderKL.load_config(str(base), subfolder="vae"))
    except (OSError, ValueError) as error:
        raise BaseModelError(f"{base}: cannot read the base model's UNet/VAE configs ({error})") from None


def convert(weights: str | Path, base: str | Path, out_file: str | Path) -> None:
    """Write a release .ckpt (model or CFW file) as its safetensors copy, shaped by the base at `base`."""
    unet_config, vae_config = base_configs(base)
    parts = read(weights, unet_config, vae_config, unet_config["norm_num_groups"])
    if not any(getattr(parts, name) for name in PART_NAMES):
        raise WeightsError(f"{weights}: holds no StableSR weights")
    write_copy(parts, out_file)
