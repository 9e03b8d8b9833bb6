"""LDM (CompVis / Lightning) key names <-> the diffusers layout, for StableSR's checkpoints.

diffusers' single-file helpers convert the SD UNet and VAE; what they do not know is converted here:
the SFT (`spade`) layers ride along with their ResBlocks, the time-aware encoder
(`structcond_stage_model.*`) maps onto diffusers down/mid blocks (its legacy fused-qkv attention is
split per head), and the CFW fusion layers (`decoder.fusion_layer_*`) keep their names.
The inverse direction exists to write random weights in the release format (diffsr.testing).
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
ENCODER_PREFIX = "structcond_stage_model."
VAE_PREFIX = "first_stage_model."

_LDM_RESNET_NAMES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                     ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _rename(name: str, pairs) -> str:
    for old, new in pairs:
        name = name.replace(old, new)
    return name


# ---------------------------------------------------------------------------------------------- UNet
def unet_from_ldm(state: dict, unet_config: dict) -> dict:
    """`model.diffusion_model.*` (with `spade` layers) -> UNet2DConditionModel keys with `.sft.` layers."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(state, dict(unet_config))
    return {k.replace(".spade.", ".sft."): v for k, v in converted.items()}


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    """Inverse of unet_from_ldm (keys only get renamed; the tensors are the same). Also names a ControlNet's
    own layers (CCSR v1's `control_model.*`: zero_convs, middle_block_out)."""
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "controlnet_mid_block": "middle_block_out.0"}
    out = {}
    for key, value in state.items():
        name = key.replace(".sft.", ".spade.")
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", name):
            name = f"zero_convs.{m.group(1)}.0.{m.group(2)}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = 1 + block * per_down + layer
            name = f"input_blocks.{index}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
            name = f"input_blocks.{(int(m.group(1)) + 1) * per_down}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", name):
            name = f"middle_block.{2 * int(m.group(1))}.{_ldm_resnet(m.group(2))}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
            name = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = block * per_up + layer
            name = f"output_blocks.{index}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
            block = int(m.group(1))
            slot = 2 if block in up_has_attention else 1
            name = f"output_blocks.{block * per_up + layers_per_block}.{slot}.conv.{m.group(2)}"
        else:
            head, _, tail = name.rpartition(".")
            if head not in fixed:
                raise KeyError(f"no LDM name for UNet key {key}")
            name = f"{fixed[head]}.{tail}"
        out[name] = value
    return out


def _ldm_resnet(rest: str) -> str:
    if rest.startswith("spade."):
        return rest
    return _rename(rest, [(new, old) for old, new in _LDM_RESNET_NAMES])


# -------------------------------------------------------------------------------- time-aware encoder
def encoder_config_from_ldm(state: dict, norm_groups: int, num_heads: int = 4) -> dict:
    """The TimeAwareEncoder arguments implied by `structcond_stage_model.*` tensor shapes.
    (Head count and GroupNorm groups are not stored: the release uses 4 heads and the UNet's groups.)"""
    conv_in = state["input_blocks.0.0.weight"]
    model_channels = conv_in.shape[0]
    maps = sorted({int(k.split(".")[1]) for k in state if k.startswith("fea_tran.")})
    widths = [state[f"fea_tran.{i}.in_layers.0.weight"].shape[0] for i in maps]
    levels = len(maps)
    blocks = len({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    num_res_blocks = blocks // levels - 1
    attention_levels = sorted({(int(k.split(".")[1]) - 1) // (num_res_blocks + 1)
                               for k in state if re.match(r"input_blocks\.\d+\.1\.qkv\.weight", k)})
    return dict(in_channels=conv_in.shape[1], model_channels=model_channels,
                out_channels=state["fea_tran.0.out_layers.3.weight"].shape[0],
                channel_mult=tuple(w // model_channels for w in widths), num_res_blocks=num_res_blocks,
                attention_levels=tuple(attention_levels), num_heads=num_heads, norm_groups=norm_groups)


def _split_qkv(tensor: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """The legacy attention's fused qkv is laid out [head][q|k|v][channel]; return q, k, v head-major."""
    total = tensor.shape[0]
    channels = total // 3
    grouped = tensor.reshape(heads, 3, channels // heads, *tensor.shape[1:])
    return tuple(grouped[:, i].reshape(channels, *tensor.shape[1:]) for i in range(3))


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    channels = q.shape[0]
    parts = [t.reshape(heads, 1, channels // heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(3 * channels, *q.shape[1:])


def _encoder_places(config: dict):
    """(LDM block prefix, our module prefix, kind) for every block of the time-aware encoder."""
    per_level = config["num_res_blocks"] + 1
    places = []
    for level in range(len(config["channel_mult"])):
        for layer in range(config["num_res_blocks"]):
            index = 1 + level * per_level + layer
            places.append((f"input_blocks.{index}.0.", f"down_blocks.{level}.resnets.{layer}.", "resnet"))
            places.append((f"input_blocks.{index}.1.", f"down_blocks.{level}.attentions.{layer}.", "attention"))
        if level < len(config["channel_mult"]) - 1:
            places.append((f"input_blocks.{(level + 1) * per_level}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", "plain"))
    places += [("middle_block.0.", "mid_block.resnets.0.", "resnet"), ("middle_block.1.", "mid_block.attentions.0.", "attention"),
               ("middle_block.2.", "mid_block.resnets.1.", "resnet"), ("input_blocks.0.0.", "conv_in.", "plain"),
               ("time_embed.0.", "time_embedding.linear_1.", "plain"), ("time_embed.2.", "time_embedding.linear_2.", "plain")]
    places += [(f"fea_tran.{i}.", f"fea_tran.{i}.", "resnet") for i in range(len(config["channel_mult"]))]
    return places


def encoder_from_ldm(state: dict, config: dict) -> dict:
    """`structcond_stage_model.*` (prefix stripped) -> TimeAwareEncoder keys."""
    heads = config["num_heads"]
    out = {}
    for ldm, ours, kind in _encoder_places(config):
        keys = [k for k in state if k.startswith(ldm)]
        if kind == "attention":
            if not keys:
                continue
            for part in ("weight", "bias"):
                q, k, v = _split_qkv(state[f"{ldm}qkv.{part}"], heads)
                for name, tensor in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                    out[f"{ours}{name}.{part}"] = tensor.reshape(tensor.shape[0], -1) if part == "weight" else tensor
                out[f"{ours}group_norm.{part}"] = state[f"{ldm}norm.{part}"]
                proj = state[f"{ldm}proj_out.{part}"]
                out[f"{ours}to_out.0.{part}"] = proj.reshape(proj.shape[0], -1) if part == "weight" else proj
            continue
        for key in keys:
            rest = key[len(ldm):]
            out[ours + (_rename(rest, _LDM_RESNET_NAMES) if kind == "resnet" else rest)] = state[key]
    return out


def encoder_to_ldm(state: dict, config: dict) -> dict:
    heads = config["num_heads"]
    out = {}
    for ldm, ours, kind in _encoder_places(config):
        keys = [k for k in state if k.startswith(ours)]
        if kind == "attention":
            if not keys:
                continue
            for part in ("weight", "bias"):
                q, k, v = (state[f"{ours}{name}.{part}"] for name in ("to_q", "to_k", "to_v"))
                fused = _fuse_qkv(q, k, v, heads)
                out[f"{ldm}qkv.{part}"] = fused[..., None] if part == "weight" else fused
                out[f"{ldm}norm.{part}"] = state[f"{ours}group_norm.{part}"]
                proj = state[f"{ours}to_out.0.{part}"]
                out[f"{ldm}proj_out.{part}"] = proj[..., None] if part == "weight" else proj
            continue
        for key in keys:
            rest = key[len(ours):]
            out[ldm + (_ldm_resnet(rest) if kind == "resnet" else rest)] = state[key]
    return out


# ----------------------------------------------------------------------------------- VAE and fusion
_FUSION = re.compile(r"decoder\.fusion_layer_(\d+)\.(.*)")


def vae_from_ldm(state: dict, vae_config: dict) -> tuple[dict, dict]:
    """An LDM autoencoder state (prefix stripped) -> (AutoencoderKL keys, fusion-layer keys)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    plain = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
             and not _FUSION.match(k)}
    vae = convert_ldm_vae_checkpoint(plain, dict(vae_config))
    fusion = {}
    for key, value in state.items():
        if m := _FUSION.match(key):
            rest = re.sub(r"^(encode_enc_[13])\.conv_out\.", r"\1.conv_shortcut.", m.group(2))
            fusion[f"{m.group(1)}.{rest}"] = value
    return vae, fusion


def vae_to_ldm(vae_state: dict, fusion_state: dict, levels: int) -> dict:
    out = {}
    attention = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
    for key, value in vae_state.items():
        name = key
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
            name = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
            name = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
            name = f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
            name = f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", name):
            name = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", name):
            name = f"{m.group(1)}.mid.attn_1.{_rename(m.group(2), attention)}.{m.group(3)}"
            if m.group(3) == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        else:
            name = name.replace("conv_norm_out", "norm_out")
        out[name] = value
    for key, value in fusion_state.items():
        level, rest = key.split(".", 1)
        rest = re.sub(r"^(encode_enc_[13])\.conv_shortcut\.", r"\1.conv_out.", rest)
        out[f"decoder.fusion_layer_{level}.{rest}"] = value
    return out
