"""StableSR's own networks, around diffusers' UNet and VAE.

- `SFT`: the spatial feature transform after every UNet ResBlock (GroupNorm, then * (1 + gamma) + beta
  from the time-aware encoder's map of the same width).
- `add_sft`: puts an SFT into each ResnetBlock2D of a diffusers UNet2DConditionModel and hooks it onto
  the block's last convolution (before the skip add); `SFTUNet` calls the UNet with the condition maps.
- `TimeAwareEncoder`: the contracting half-UNet fed the LR latent and t (paper Table 7), built from
  diffusers' down/mid blocks; returns four maps keyed by their width.
- `CFWAutoencoder`: a diffusers AutoencoderKL plus the controllable feature wrapping layers: the decoder
  gets `dec + w * fuse(cat(enc, dec))` after the res blocks of its middle up-levels.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from diffsr import tiling
from diffsr.tiling import FeatureMap, TilingOptions, VaeRunner

SFT_HIDDEN = 128  # the release's SPADE hard-codes its hidden width


class SFT(nn.Module):
    """Condition-map modulation of a ResBlock's residual branch (the release's SPADE layer)."""

    def __init__(self, channels: int, cond_channels: int, groups: int, hidden: int = SFT_HIDDEN):
        super().__init__()
        self.param_free_norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(cond)
        # The release normalises in float32 (its GroupNorm32), also when the model runs in half precision.
        norm = self.param_free_norm
        normalized = F.group_norm(h.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps).to(h.dtype)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def unet_resnets(unet: nn.Module):
    """(name, ResnetBlock2D) for every ResBlock of a UNet2DConditionModel: down, mid and up blocks."""
    from diffusers.models.resnet import ResnetBlock2D

    return [(name, module) for name, module in unet.named_modules() if isinstance(module, ResnetBlock2D)]


def add_sft(unet: nn.Module, cond_channels: int, hidden: int = SFT_HIDDEN) -> "SFTConditions":
    """Give every ResnetBlock2D of `unet` an `sft` submodule applied to the output of its `conv2`.

    The SFT parameters live inside the diffusers module tree (`...resnets.0.sft.*`), so
    `unet.state_dict()` holds the whole StableSR UNet. Returns the holder the hooks read the maps from.
    """
    conditions = SFTConditions()
    groups = unet.config.norm_num_groups
    for _, resnet in unet_resnets(unet):
        resnet.sft = SFT(resnet.conv2.out_channels, cond_channels, groups, hidden)

        def modulate(conv, inputs, output, sft=resnet.sft):
            return sft(output, conditions.for_width(output.shape[-1]))

        resnet.conv2.register_forward_hook(modulate)
    return conditions


class SFTConditions:
    """The time-aware encoder's maps for the UNet call in progress, looked up by feature width."""

    def __init__(self):
        self.maps: dict[int, torch.Tensor] | None = None

    def for_width(self, width: int) -> torch.Tensor:
        if self.maps is None:
            raise RuntimeError("a StableSR UNet must be called through SFTUNet (it needs the encoder's maps)")
        return self.maps[width]


class SFTUNet(nn.Module):
    """A diffusers UNet2DConditionModel with StableSR's SFT layers; call with the encoder's maps."""

    def __init__(self, unet: nn.Module, cond_channels: int, hidden: int = SFT_HIDDEN):
        super().__init__()
        self.unet = unet
        self.conditions = add_sft(unet, cond_channels, hidden)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                maps: dict[int, torch.Tensor]) -> torch.Tensor:
        # The maps stay set after the call: gradient checkpointing re-runs the SFT hooks during the backward
        # pass (training), and they must find the same maps then.
        self.conditions.maps = maps
        return self.unet(latent, timestep, encoder_hidden_states=text).sample


class TimeAwareEncoder(nn.Module):
    """The release's EncoderUNetModelWT: conv_in, down levels (ResBlocks + legacy attention), a middle
    block, and one ResBlock per output map (`fea_tran`). Maps are taken before each downsampling and
    after the middle block."""

    def __init__(self, in_channels: int = 4, model_channels: int = 256, out_channels: int = 256,
                 channel_mult=(1, 1, 2, 2), num_res_blocks: int = 2, attention_levels=(0, 1, 2),
                 num_heads: int = 4, norm_groups: int = 32):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.unets.unet_2d_blocks import AttnDownBlock2D, DownBlock2D, UNetMidBlock2D

        self.config = dict(in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
                           channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                           attention_levels=tuple(attention_levels), num_heads=num_heads, norm_groups=norm_groups)
        time_dim = model_channels * 4
        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(model_channels, time_dim)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        common = dict(temb_channels=time_dim, num_layers=num_res_blocks, resnet_eps=1e-5, resnet_groups=norm_groups)
        self.down_blocks = nn.ModuleList()
        map_channels = []
        channels = model_channels
        for level, mult in enumerate(channel_mult):
            out = mult * model_channels
            last = level == len(channel_mult) - 1
            if level in attention_levels:
                block = AttnDownBlock2D(channels, out, attention_head_dim=out // num_heads,
                                        downsample_type=None if last else "conv", **common)
            else:
                block = DownBlock2D(channels, out, add_downsample=not last, **common)
            self.down_blocks.append(block)
            channels = out
            if not last:
                map_channels.append(channels)
        self.mid_block = UNetMidBlock2D(channels, time_dim, resnet_eps=1e-5, resnet_groups=norm_groups,
                                        attention_head_dim=channels // num_heads)
        map_channels.append(channels)
        self.fea_tran = nn.ModuleList(
            ResnetBlock2D(in_channels=c, out_channels=out_channels, temb_channels=time_dim, eps=1e-5, groups=norm_groups)
            for c in map_channels)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor) -> dict[int, torch.Tensor]:
        temb = self.time_embedding(self.time_proj(timestep.expand(latent.shape[0])).to(latent.dtype))
        h = self.conv_in(latent)
        features = []
        for block in self.down_blocks:
            attentions = getattr(block, "attentions", None)
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb)
                if attentions is not None:
                    h = attentions[i](h)
            if block.downsamplers is not None:
                features.append(h)
                h = block.downsamplers[0](h)
        features.append(self.mid_block(h, temb))
        return {f.shape[-1]: tran(f, temb) for f, tran in zip(features, self.fea_tran)}


class ResidualDenseBlock(nn.Module):
    """ESRGAN's dense block (5 convs, growth `grow`, LeakyReLU 0.2, residual scaled by 0.2).
    Written here because diffusers has no RRDB and the fusion layers need exactly this one."""

    def __init__(self, channels: int, grow: int = 32):
        super().__init__()
        for i in range(5):
            out = channels if i == 4 else grow
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels + i * grow, out, 3, padding=1))

    def forward(self, x):
        features = [x]
        for i in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, channels: int, grow: int = 32):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(channels, grow) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class FusionLayer(nn.Module):
    """CFW: ResBlock(2C->C), RRDBs, ResBlock(C->C) on cat(encoder, decoder) features, added with weight w."""

    def __init__(self, channels: int, groups: int, num_rrdb: int = 2):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D

        self.encode_enc_1 = ResnetBlock2D(in_channels=2 * channels, out_channels=channels, temb_channels=None,
                                          groups=groups, eps=1e-6)
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels) for _ in range(num_rrdb)))
        self.encode_enc_3 = ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=None,
                                          groups=groups, eps=1e-6)

    def forward(self, enc: FeatureMap, dec: FeatureMap, w: float, runner: VaeRunner | None = None) -> FeatureMap:
        """On whole tensors, or through the tiled VAE's `runner` on the maps it gives (bands, shared norms).
        `enc` is taken in `dec`'s dtype: one of the two passes may have been redone in float32 (tiling.vae)."""
        if runner is None:  # the decoder runs untiled (if the encoder did not, its map may be spilled)
            enc = VaeRunner.band(enc, 0, enc.shape[2]).to(dec.dtype)
            fused = self.encode_enc_1(torch.cat([enc, dec], dim=1), None)
            return dec + w * self.encode_enc_3(self.encode_enc_2(fused), None)
        fused = runner.resnet(self.encode_enc_1,
                              runner.local(lambda e, d: torch.cat([e.to(d.dtype), d], dim=1), enc, dec))
        # each dense block's 5 convolutions see 5 rows further, 3 blocks per RRDB
        fused = runner.local(self.encode_enc_2, fused, halo=15 * len(self.encode_enc_2))
        fused = runner.resnet(self.encode_enc_3, fused)
        return runner.local(lambda d, f: d + w * f, dec, fused)


def fusion_levels(vae: nn.Module) -> list[int]:
    """LDM level indices that get a fusion layer: every level but the first and the last."""
    return list(range(1, len(vae.config.block_out_channels) - 1))


class CFWAutoencoder(nn.Module):
    """A diffusers AutoencoderKL whose decoder can take the encoder's features (StableSR's CFW).

    `encode` returns (latent distribution, features); `decode(z, features, w)` with w = 0 or no fusion
    layers is exactly the plain decoder. Both run through diffsr.tiling (any size, bounded memory)."""

    def __init__(self, vae: nn.Module, with_fusion: bool = True):
        super().__init__()
        self.vae = vae
        channels = vae.config.block_out_channels
        self.fusion = nn.ModuleDict({
            str(level): FusionLayer(channels[level], vae.config.norm_num_groups) for level in fusion_levels(vae)
        }) if with_fusion else nn.ModuleDict()

    @property
    def levels(self) -> int:
        return len(self.vae.config.block_out_channels)

    def encode(self, image: torch.Tensor, options: TilingOptions = TilingOptions()):
        """(latent distribution, the encoder's feature maps {fusion level: map}). In the bounded tiled mode the
        maps are spilled off the device (diffsr.tiling), so nothing image-sized stays on it for the decoder."""
        features: dict[int, FeatureMap] = {}

        def keep(level):
            return lambda module, output, runner: features.__setitem__(level, output)

        keeps = {self.vae.encoder.down_blocks[int(level)].resnets[-1]: keep(int(level)) for level in self.fusion}
        return tiling.vae_encode(self.vae, image, options, callbacks=keeps), features

    def decode(self, z: torch.Tensor, features: dict[int, FeatureMap] | None = None, w: float = 0.0,
               options: TilingOptions = TilingOptions()) -> torch.Tensor:
        if w == 0 or features is None or len(self.fusion) == 0:
            return tiling.vae_decode(self.vae, z, options)

        def fuse(level):
            layer = self.fusion[str(level)]
            return lambda module, output, runner: layer(features[level], output, w, runner)

        # diffusers orders decoder up-blocks from the lowest resolution: LDM level l is up_blocks[-1 - l].
        fuses = {self.vae.decoder.up_blocks[self.levels - 1 - int(level)].resnets[-1]: fuse(int(level))
                 for level in self.fusion}
        return tiling.vae_decode(self.vae, z, options, callbacks=fuses, callback_modules=[self.fusion])
