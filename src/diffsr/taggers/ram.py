"""RAM's tagging path (Recognize Anything, Swin image encoder + label-query head), with DAPE's LoRA folded in.

Only what tagging needs is built: the Swin encoder, `image_proj`, the label embeddings through `wordvec_proj`, the
two cross-attention layers of `tagging_head` and `fc`. Module names are the release's, so ram_swin_large_14m.pth
(its "model" dict) and DAPE.pth load unchanged; sizes are read from the state dict. Facts: OSEDiff's ram/ folder
(ram_lora.py, swin_transformer_lora.py, bert_lora.py, configs/q2l_config.json) and test_osediff.py.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.errors import ImageError, WeightsError

IMAGE_SIZE = 384  # RAM Swin-L at 384 (configs/swin/config_swinL_384.json)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_HEADS = 4  # q2l_config.json: num_attention_heads (not recorded in the weights)
BERT_EPS = 1e-12  # q2l_config.json: layer_norm_eps
# The release resizes with torchvision's tensor Resize under its pinned torch 2.0.1 (torchvision 0.15), whose
# default for tensors is bilinear without antialiasing.
RESIZE_ANTIALIAS = False


def _windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, size * size, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, c)


def _unwindow(windows: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // size, w // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _relative_position_index(size: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (size - 1)
    return relative[..., 0] * (2 * size - 1) + relative[..., 1]


def _shift_mask(h: int, w: int, size: int, shift: int) -> torch.Tensor:
    """Swin's mask for shifted windows: -100 between tokens that come from different regions."""
    regions = torch.zeros(1, h, w, 1)
    bounds = (slice(0, -size), slice(-size, -shift), slice(-shift, None))
    for index, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        regions[:, rows, cols, :] = index
    regions = _windows(regions, size).squeeze(-1)
    mask = regions[:, None, :] - regions[:, :, None]
    return mask.masked_fill(mask != 0, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n_windows, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(n_windows, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, -1).permute(2, 0, 1)[None]
        if mask is not None:  # one (T, T) mask per window position, the same for every image of the batch
            bias = (bias + mask[:, None].to(bias.dtype)).repeat(n_windows // mask.shape[0], 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n_windows, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, resolution: int, hidden: int):
        super().__init__()
        self.window, self.shift, self.resolution = window, shift, resolution
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim, hidden)
        mask = _shift_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        size = self.resolution
        y = self.norm1(x).view(b, size, size, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = _unwindow(self.attn(_windows(y, self.window), self.attn_mask), self.window, size, size)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, size * size, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim, depth, heads, window, resolution, hidden, downsample: bool):
        super().__init__()
        # Swin's rule: a stage no larger than its window is one unshifted window.
        shift = 0 if resolution <= window else window // 2
        window = min(window, resolution)
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, shift if i % 2 else 0, resolution, hidden)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinEncoder(nn.Module):
    """Swin at IMAGE_SIZE; returns (B, 1 + tokens, C): the mean token, then the last stage's tokens."""

    def __init__(self, dim: int, patch: int, depths: list[int], heads: list[int], windows: list[int],
                 hidden_ratio: float):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        resolution = IMAGE_SIZE // patch
        self.layers = nn.ModuleList()
        for i, (depth, head, window) in enumerate(zip(depths, heads, windows)):
            width = dim * 2 ** i
            self.layers.append(SwinStage(width, depth, head, window, resolution // 2 ** i, int(width * hidden_ratio),
                                         i < len(depths) - 1))
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], 1)


class _Attention(nn.Module):
    def __init__(self, hidden: int, context: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(context, hidden), nn.Linear(context, hidden)


class _Output(nn.Module):
    def __init__(self, inner: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=BERT_EPS)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _CrossAttention(nn.Module):
    def __init__(self, hidden: int, context: int):
        super().__init__()
        setattr(self, "self", _Attention(hidden, context))  # the release's BERT name for the q/k/v part
        self.output = _Output(hidden, hidden)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)


class TaggingLayer(nn.Module):
    """A layer of RAM's tagging head: BERT's cross-attention + feed-forward, its self-attention deleted (as the
    release's del_selfattention does). Written here because transformers' BertLayer always runs self-attention."""

    def __init__(self, hidden: int, context: int, inner: int):
        super().__init__()
        self.crossattention = _CrossAttention(hidden, context)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _Output(inner, hidden)

    def forward(self, labels: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        attention = getattr(self.crossattention, "self")
        b, n, hidden = labels.shape

        def heads(x):
            return x.view(b, -1, HEAD_HEADS, hidden // HEAD_HEADS).transpose(1, 2)

        context = F.scaled_dot_product_attention(heads(attention.query(labels)), heads(attention.key(image)),
                                                 heads(attention.value(image)))
        attended = self.crossattention.output(context.transpose(1, 2).reshape(b, n, hidden), labels)
        return self.output(F.gelu(self.intermediate.dense(attended)), attended)


class TaggingHead(nn.Module):
    def __init__(self, layers: int, hidden: int, context: int, inner: int):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(TaggingLayer(hidden, context, inner) for _ in range(layers))

    def forward(self, labels, image):
        for layer in self.encoder.layer:
            labels = layer(labels, image)
        return labels


class RamModel(nn.Module):
    """RAM's tagging network: normalized 384 px images -> one logit per class."""

    def __init__(self, swin: dict, head: dict, classes: int, label_width: int, vision_width: int):
        super().__init__()
        self.visual_encoder = SwinEncoder(**swin)
        self.image_proj = nn.Linear(vision_width, label_width)
        self.label_embed = nn.Parameter(torch.zeros(classes, label_width))
        hidden = head["hidden"]
        self.wordvec_proj = nn.Linear(label_width, hidden) if hidden != label_width else nn.Identity()
        self.tagging_head = TaggingHead(head["layers"], hidden, label_width, head["inner"])
        self.fc = nn.Linear(hidden, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = self.image_proj(self.visual_encoder(pixels))
        labels = F.relu(self.wordvec_proj(self.label_embed)).unsqueeze(0).expand(len(pixels), -1, -1)
        return self.fc(self.tagging_head(labels, image)).squeeze(-1)


# -- the release's files -------------------------------------------------------------------------------------
_TAGGING_PREFIXES = ("visual_encoder.", "image_proj.", "label_embed", "wordvec_proj.", "tagging_head.", "fc.")
_BUFFERS = ("relative_position_index", "attn_mask")  # rebuilt here, as the release's loader drops them


def tagging_state(state: dict, name: str) -> dict:
    """The tagging weights of a RAM checkpoint ({"model": ...} or a bare state dict), in the release's names
    (its loader renames "vision_multi" to "tagging_head")."""
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    out = {}
    for key, value in state.items():
        key = key.replace("vision_multi", "tagging_head")
        if key.startswith(_TAGGING_PREFIXES) and not key.endswith(_BUFFERS) and ".lora_" not in key:
            if not isinstance(value, torch.Tensor):
                raise WeightsError(f"{name}: '{key}' is not a tensor")
            out[key] = value
    if "label_embed" not in out or "visual_encoder.patch_embed.proj.weight" not in out:
        raise WeightsError(f"{name}: not a RAM checkpoint (no label_embed / Swin visual_encoder weights)")
    return out


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def build_model(state: dict, name: str) -> RamModel:
    """A RamModel shaped as the weights in `state` (a tagging_state) say, with them loaded."""
    patch = state["visual_encoder.patch_embed.proj.weight"]
    stages = _count(state, r"visual_encoder\.layers\.(\d+)\.")
    depths = [_count(state, rf"visual_encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)]
    tables = [state[f"visual_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
    windows = [(math.isqrt(t.shape[0]) + 1) // 2 for t in tables]
    dim = patch.shape[0]
    for stage, window in enumerate(windows):
        resolution = IMAGE_SIZE // patch.shape[-1] // 2 ** stage
        if resolution > window and resolution % window:
            raise WeightsError(f"{name}: Swin stage {stage} has relative-position tables for {window} px windows, "
                               f"which do not tile its {resolution} px grid at {IMAGE_SIZE} px input")
    swin = dict(dim=dim, patch=patch.shape[-1], depths=depths, heads=[t.shape[1] for t in tables], windows=windows,
                hidden_ratio=state["visual_encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dim)
    fc = state["fc.weight"]
    head = dict(layers=_count(state, r"tagging_head\.encoder\.layer\.(\d+)\."), hidden=fc.shape[1],
                inner=state["tagging_head.encoder.layer.0.intermediate.dense.weight"].shape[0])
    label_embed = state["label_embed"]
    model = RamModel(swin, head, label_embed.shape[0], label_embed.shape[1], dim * 2 ** (stages - 1))
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(state))
    problems += [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if problems:
        raise WeightsError(f"{name}: RAM weights do not fit together ({len(problems)} problems, first: {problems[0]})")
    model.load_state_dict(state)
    return model


def apply_dape(state: dict, dape: dict, name: str) -> int:
    """Put DAPE.pth over the RAM tagging weights as the release does (load_state_dict(strict=False), then
    loralib merging the LoRA at eval()): tensors named like a tagging weight replace it, and each LoRA pair on a
    Swin qkv (loralib MergedLinear, q and v only) or a tagging-head query/key (loralib Linear) is folded into
    its weight with the release's scaling lora_alpha / r = 1 / r. LoRA of RAM parts tagging does not use
    (tag_encoder, text_decoder) is skipped. Returns how many LoRA layers were folded."""
    dape = {key.replace("vision_multi", "tagging_head"): value for key, value in dape.items()}
    for key, value in dape.items():
        if key in state and ".lora_" not in key:
            if not isinstance(value, torch.Tensor) or value.shape != state[key].shape:
                raise WeightsError(f"{name}: '{key}' does not fit this RAM ({_shape(value)} vs "
                                   f"{tuple(state[key].shape)}): the file is for another RAM size")
            state[key] = value
    folded = 0
    for key in sorted(k for k in dape if k.endswith(".lora_A")):
        layer = key[: -len(".lora_A")]
        if not layer.startswith(("visual_encoder.", "tagging_head.")):
            continue
        down, up, weight = dape[key], dape.get(layer + ".lora_B"), state.get(layer + ".weight")
        if weight is None or not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
            raise WeightsError(f"{name}: LoRA '{layer}' has no partner lora_B or no such RAM layer")
        state[layer + ".weight"] = weight + _lora_delta(layer, down.float(), up.float(), weight, name).to(weight.dtype)
        folded += 1
    if not folded:
        raise WeightsError(f"{name}: holds no DAPE LoRA weights for RAM's image encoder or tagging head")
    return folded


def _lora_delta(layer: str, down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    out_features, in_features = weight.shape
    if layer.endswith(".qkv"):  # MergedLinear(dim, 3 dim, enable_lora=[True, False, True]): q and v
        rank = down.shape[0] // 2
        fits = down.shape == (2 * rank, in_features) and up.shape == (2 * out_features // 3, rank)
    else:
        rank = down.shape[0]
        fits = down.shape == (rank, in_features) and up.shape == (out_features, rank)
    if not fits or rank == 0:
        raise WeightsError(f"{name}: LoRA '{layer}' ({_shape(down)}, {_shape(up)}) does not fit RAM's layer "
                           f"{tuple(weight.shape)}: the file is for another RAM size")
    if not layer.endswith(".qkv"):
        return up @ down / rank
    dim = out_features // 3
    delta = torch.zeros(out_features, in_features)
    delta[:dim] = up[:dim] @ down[:rank]
    delta[2 * dim:] = up[dim:] @ down[rank:]
    return delta / rank


def _shape(value) -> tuple | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


class RamTagger:
    """Images (B, 3, H, W) in [0, 1] -> one tag string per image ("tag, tag, ..." as OSEDiff's RAM copy joins)."""

    def __init__(self, model: RamModel, tags: list[str], thresholds: torch.Tensor, device, dtype):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tags = tags
        self.thresholds = thresholds.float().to(device)
        self.device, self.dtype = torch.device(device), dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """As test_osediff.py's ram_transforms: resize to 384 x 384, ImageNet normalisation, then the dtype."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ImageError(f"the tagger takes an image batch (B, 3, H, W), got {_shape(images)}")
        if images.shape[-1] < 1 or images.shape[-2] < 1 or images.shape[0] < 1:
            raise ImageError(f"the tagger cannot tag an empty image (shape {tuple(images.shape)})")
        images = images.to(self.device, torch.float32)
        pixels = F.interpolate(images, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                               antialias=RESIZE_ANTIALIAS)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.dtype)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images))

    def tags_of(self, logits: torch.Tensor) -> list[str]:
        chosen = torch.sigmoid(logits) > self.thresholds  # compared in float32, as the release does
        return [", ".join(self.tags[i] for i in row.nonzero().flatten().tolist()) for row in chosen.cpu()]

    def __call__(self, images: torch.Tensor) -> list[str]:
        return self.tags_of(self.logits(images))
