"""Tiny random models in the real on-disk formats, for tests, benchmarks and offline smoke runs.

`make_tiny_base(path)` writes an SD-2.x-shaped Stable Diffusion folder (diffusers layout) and
`make_tiny_weights(method, base, out)` writes random method weights in the authors' release format.
The loaders treat them exactly like the real files; only the sizes differ.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from diffsr.backbone import quiet_loading

# SD 2.x scheduler config as released (PNDM in the folder; methods build DDPM/DDIM from it).
SD2_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_TEXT_DIM = 32


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-character table (needed to write a valid byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_tokenizer(folder: Path) -> int:
    """A CLIP tokenizer with the 512 byte-level symbols and no merges; returns the vocabulary size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # SD 2.x pads with "!" (id 0), not with <|endoftext|> as SD 1.x does.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(vocab)


def make_tiny_base(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD-2.x-shaped base model (UNet, VAE, CLIP text encoder, tokenizer, scheduler).

    The layout and module names are those of SD 2.1-base (registry name sd21-base); channel counts,
    depths and the text width are shrunk so a forward pass takes milliseconds on a CPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        _write_tiny_base(path, seed, prediction_type)
    return path


def _write_tiny_base(path: Path, seed: int, prediction_type: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)

    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4, 4, 4),
        cross_attention_dim=TINY_TEXT_DIM,
        norm_num_groups=8,
        use_linear_projection=True,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    unet.save_pretrained(path / "unet")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(path / "vae")

    vocab_size = _write_tokenizer(path / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=TINY_TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=0,
    )
    CLIPTextModel(text_config).save_pretrained(path / "text_encoder")
    _prefix_text_encoder_keys(path / "text_encoder" / "model.safetensors")

    (path / "scheduler").mkdir(exist_ok=True)
    scheduler = dict(SD2_SCHEDULER_CONFIG, prediction_type=prediction_type)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))


def _prefix_text_encoder_keys(file: Path) -> None:
    """Released SD text encoders name their tensors 'text_model.*'; transformers 5 saves them without the
    prefix, which older transformers (the authors' environments) silently fail to load."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(file))
    if not all(key.startswith("text_model.") for key in state):
        save_file({f"text_model.{k}": v for k, v in state.items()}, str(file), metadata={"format": "pt"})


def make_tiny_weights(method: str, base_path: str | Path, out_file: str | Path, seed: int = 0) -> Path:
    """Write random weights for `method` in the authors' release format, shaped for the base at `base_path`."""
    from diffsr.methods import get_method

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    get_method(method)  # an unknown name is one clear error listing the methods
    TINY_WRITERS[method](Path(base_path), out_file, seed)
    if method == "osediff":  # its default tagger's files, found beside the weights as the real ones would be
        make_tiny_tagger(out_file.parent, seed)
    return out_file


def _write_tiny_stablesr(base: Path, out_file: Path, seed: int = 0, encoder_channels: int | None = None) -> None:
    """A random StableSR .ckpt pair in the release's format, shaped for `base`: `out_file` (UNet with SFT layers,
    time-aware encoder, first-stage VAE) and vqgan_cfw_00011.ckpt (VAE + fusion layers) beside it.
    `encoder_channels`: the time-aware encoder's width (the release's: 256); None: the UNet's first width."""
    from diffsr.backbone import load_backbone
    from diffsr.checkpoints import stablesr as checkpoint
    from diffsr.nets.stablesr_nets import SFT_HIDDEN, CFWAutoencoder, TimeAwareEncoder, add_sft

    backbone = load_backbone(base)
    unet, vae = backbone.unet, backbone.vae
    channels = encoder_channels or unet.config.block_out_channels[0]
    add_sft(unet, channels, SFT_HIDDEN)
    encoder = TimeAwareEncoder(in_channels=4, model_channels=channels, out_channels=channels, channel_mult=(1, 1, 2, 2),
                               num_res_blocks=2, attention_levels=(0, 1, 2), num_heads=4,
                               norm_groups=unet.config.norm_num_groups)
    fusion = CFWAutoencoder(vae).fusion
    generator = torch.Generator().manual_seed(seed)

    def randomize(module: torch.nn.Module, only=lambda key: True) -> dict:
        # Small random values so every layer acts but activations stay bounded through the stack; every norm
        # scale (the base UNet's too, as the recorded fixtures were made) + 1.
        state = {k: (torch.randn(v.shape, generator=generator) * 0.05 if only(k) else v).contiguous()
                 for k, v in module.state_dict().items()}
        return {k: v + 1 if "norm" in k and k.endswith("weight") and v.ndim == 1 else v for k, v in state.items()}

    unet_state, encoder_state = randomize(unet, lambda key: ".sft." in key), randomize(encoder)
    checkpoint.write(checkpoint.Parts(unet=unet_state, encoder=encoder_state, encoder_config=encoder.config,
                                      vae=vae.state_dict(), alphas_cumprod=backbone.alphas_cumprod), out_file)
    checkpoint.write(checkpoint.Parts(vae=vae.state_dict(), fusion=randomize(fusion)), out_file.parent / checkpoint.CFW_NAME)


def _write_tiny_osediff(base_path: Path, out_file: Path, seed: int) -> None:
    """A random osediff.pkl (rank 4) with the release's keys, lists and adapter names, through its writer."""
    from diffsr.backbone import load_backbone
    from diffsr.checkpoints import osediff as checkpoint
    from diffsr.methods.osediff import fresh_adapters

    backbone = load_backbone(base_path)
    parts = checkpoint.parts_of(backbone.unet, backbone.vae, fresh_adapters(backbone, rank=4))
    generator = torch.Generator().manual_seed(seed)
    for state in (parts.unet_state, parts.vae_state):
        for key, value in state.items():
            # lora_B starts at zero in training; random here so the adapters visibly act.
            noise = torch.randn(value.shape, generator=generator) * (0.02 if "lora" in key else 0.01)
            state[key] = (value + noise).contiguous() if "base_layer" in key else noise
    checkpoint.write(parts, out_file)


def _write_tiny_s3diff(base_path: Path, out_file: Path, seed: int) -> None:
    """A random s3diff.pkl with the release's keys, targets, ranks and adapter names, and a random de_net.pth
    beside it."""
    import math

    from diffsr.backbone import load_backbone
    from diffsr.checkpoints import s3diff as release
    from diffsr.nets.de_net import DEResNet
    from diffsr.nets.s3diff_modulation import DegradationConditioner, add_modulated_lora

    backbone = load_backbone(base_path)
    generator = torch.Generator().manual_seed(seed)
    add_modulated_lora(backbone.vae, backbone.unet, release.VAE_TARGETS, release.UNET_TARGETS, release.RANK_VAE,
                       release.RANK_UNET, release.VAE_ADAPTER, release.UNET_ADAPTER)
    parts = release.Parts.of(backbone.unet, backbone.vae, DegradationConditioner(release.RANK_VAE, release.RANK_UNET))
    for state in (parts.unet, parts.vae):
        for key, value in state.items():  # views of the parameters: perturbed in place
            # lora_B starts at zero in training; random here so the adapters visibly act.
            noise = torch.randn(value.shape, generator=generator)
            # The UNet's conv_in is fully trained (perturb the base); every other tensor is LoRA state.
            value.copy_(value + 0.01 * noise if key.startswith("conv_in.") else 0.05 * noise)
    for name, value in parts.conditioner.items():
        if "bias" in name:
            scale = 0.01
        elif "mlp" in name:  # keep activations O(1); C's entries ~ 1/sqrt(r) keep the LoRA path's size
            scale = 1 / math.sqrt(value.shape[1]) / (math.sqrt(math.isqrt(value.shape[0])) if "fuse" in name else 1)
        else:  # w and the block embeddings: standard normal, as initialised in the release
            scale = 1.0
        value.copy_(torch.randn(value.shape, generator=generator) * scale)
    release.write(parts, out_file)
    estimator = DEResNet().state_dict()
    for name, value in estimator.items():
        fan_in = value[0].numel() if value.dim() > 1 else 1
        # Small residual branches (as the release initialises them) keep the scores away from 0 and 1.
        scale = (0.1 if name.startswith("body") else 1.0) * math.sqrt(2 / fan_in)
        value.copy_(torch.randn(value.shape, generator=generator) * (scale if value.dim() > 1 else 0.01))
    release.write_de_net(estimator, out_file.parent / release.DE_NET_FILE)


def _base_unet_and_vae(base: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with quiet_loading():
        return (UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                AutoencoderKL.from_pretrained(base, subfolder="vae"))


def write_random_ccsr_v2(base: Path, out: Path, seed: int = 0) -> None:
    """A random CCSR-v2 folder shaped for `base`: controlnet/ (with `use_vae_encode_condition`) and vae/ (the base
    VAE with its decoder perturbed: the stage-2 VAE)."""
    from diffsr.checkpoints import ccsr_v2
    from diffsr.nets.ccsr_controlnet import controlnet_from_unet

    unet, vae = _base_unet_and_vae(base)
    with quiet_loading():
        controlnet = controlnet_from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            # Zero-initialised convs and a copy of the UNet would hide mistakes: perturb everything.
            scale = 0.05 if ("controlnet_" in name or "condition_conv_in" in name) else 0.01
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
        for name, parameter in vae.named_parameters():
            if name.startswith(("decoder.", "post_quant_conv.")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    ccsr_v2.write(ccsr_v2.Parts(controlnet, vae), out)


def write_random_ccsr_v1(base: Path, out_file: Path, seed: int = 0) -> None:
    """A random `real-world_ccsr.ckpt`-format checkpoint for `base` (the release's OpenCLIP tensors left out)."""
    import copy

    from diffsr.checkpoints import ccsr_v1
    from diffsr.nets.ccsr_controlnet import controlnet_from_unet

    unet, vae = _base_unet_and_vae(base)
    with quiet_loading():
        controlnet = controlnet_from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    condition_vae = copy.deepcopy(vae)
    with torch.no_grad():
        for module, amount in ((controlnet, 0.02), (vae.decoder, 0.01), (condition_vae.encoder, 0.01)):
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * amount)
    ccsr_v1.write(ccsr_v1.Parts(unet.state_dict(), controlnet.state_dict(), vae.state_dict(),
                                condition_vae.state_dict()), out_file)


def _write_tiny_ccsr(base: Path, out_file: Path, seed: int) -> None:
    """A `.ckpt` name gives the v1 checkpoint, anything else the v2 folder."""
    (write_random_ccsr_v1 if out_file.suffix == ".ckpt" else write_random_ccsr_v2)(base, out_file, seed)


# Each method's random release files, written through its checkpoints module's writer.
TINY_WRITERS = {"ccsr": _write_tiny_ccsr, "osediff": _write_tiny_osediff, "s3diff": _write_tiny_s3diff,
                "stablesr": _write_tiny_stablesr}


def weights_digest(*paths: str | Path) -> str:
    """sha256 over the tensors (names, dtypes, shapes, values) in weight files and base-model folders.

    Parity fixtures store it to tell whether the tiny models they were made from have changed. File
    bytes would not do: torch.save writes a fresh serialization id each time, configs carry versions.
    """
    import hashlib

    from safetensors.torch import load_file

    from diffsr.checkpoints import read_weights

    digest = hashlib.sha256()

    def add(name: str, value) -> None:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")  # 0-d too
        elif isinstance(value, bytes):
            digest.update(value)
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                add(f"{name}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                add(f"{name}/{index}", item)
        else:
            digest.update(repr(value).encode())

    for path in map(Path, paths):
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            name = file.relative_to(path).as_posix() if path.is_dir() else file.name
            if file.suffix == ".safetensors":
                add(name, load_file(str(file)))
            elif file.suffix in (".pkl", ".pth", ".ckpt", ".bin"):
                add(name, read_weights(file))
            elif file.name in ("vocab.json", "merges.txt"):
                add(name, file.read_bytes())
    return digest.hexdigest()


# Tiny RAM: the release's layout and its full 4585-class label set, with a small Swin and tagging head.
TINY_RAM_SWIN = dict(dim=8, patch=4, depths=[2, 2, 2, 2], heads=[1, 1, 2, 2], windows=[12, 12, 12, 12], hidden_ratio=4.0)
TINY_RAM_HEAD = dict(layers=2, hidden=16, inner=32)
TINY_DAPE_RANK = 8  # the release's r


def make_tiny_tagger(folder: str | Path, seed: int = 0, fc_bias: float = -0.8) -> tuple[Path, Path]:
    """Write ram_swin_large_14m.pth ({"model": state dict}, with the buffers and the captioning parts' keys the
    release's file also holds) and DAPE.pth (LoRA pairs under the release's names) into `folder`; random,
    shaped like RAM Swin-L but tiny. `fc_bias` sets how many of the 4585 tags fire."""
    from diffsr.taggers import tag_list
    from diffsr.taggers.ram import RamModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape, std=1.0):
        return torch.randn(shape, generator=generator) * std

    model = RamModel(TINY_RAM_SWIN, TINY_RAM_HEAD, len(tag_list()), 512, TINY_RAM_SWIN["dim"] * 8)
    state = {}
    for key, value in sorted(model.state_dict().items()):
        if "norm" in key.lower() and key.endswith("weight"):
            state[key] = 1 + noise(*value.shape, std=0.1)
        elif key.endswith("bias") or "relative_position_bias_table" in key:
            state[key] = noise(*value.shape, std=0.5 if "table" in key else 0.02)
        else:
            state[key] = noise(*value.shape, std=1 / max(1, value[0].numel()) ** 0.5 if value.ndim > 1 else 1.0)
    state["fc.bias"] = torch.full((1,), fc_bias)
    for name, buffer in model.named_buffers():  # the release's file keeps these; its loader drops them
        state[name] = buffer.clone()
    state["tag_encoder.encoder.layer.0.attention.self.query.weight"] = noise(16, 16)  # captioning parts: unused
    ram_file = folder / "ram_swin_large_14m.pth"
    torch.save({"model": state}, ram_file)

    rank = TINY_DAPE_RANK
    dape = {}
    for key, value in sorted(state.items()):
        if key.endswith("attn.qkv.weight"):
            dim = value.shape[1]
            dape[key.replace(".weight", ".lora_A")] = noise(2 * rank, dim, std=0.5)
            dape[key.replace(".weight", ".lora_B")] = noise(2 * dim, rank, std=0.5)
        elif re.search(r"crossattention\.self\.(query|key)\.weight$", key):
            dape[key.replace(".weight", ".lora_A")] = noise(rank, value.shape[1], std=0.5)
            dape[key.replace(".weight", ".lora_B")] = noise(value.shape[0], rank, std=0.5)
    dape["tag_encoder.encoder.layer.0.attention.self.query.lora_A"] = noise(rank, 16)  # unused by tagging
    dape["tag_encoder.encoder.layer.0.attention.self.query.lora_B"] = noise(16, rank)
    dape_file = folder / "DAPE.pth"
    torch.save(dape, dape_file)
    return ram_file, dape_file
