"""Exact tiled VAE: a diffusers Encoder/Decoder run module by module over row bands of the feature maps. Each
GroupNorm pools its statistics over all bands before normalising and the mid-block attention attends over the
whole map, so the result equals the untiled one up to float error. The feature maps are held whole (on the
compute device); only the per-operation working memory is bounded."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffsr.tiling.norms import group_norm, map_statistics

class ExactRunner:
    """Runs a diffusers VAE Encoder/Decoder module by module over row bands of `rows` rows."""

    def __init__(self, net: torch.nn.Module, rows: int):
        self.net = net
        self.rows = max(rows, 8)

    def _local(self, fn, x: torch.Tensor, halo: int = 1, up: int = 1) -> torch.Tensor:
        """fn applied band by band; fn is local with `halo` rows of context and scales rows by `up`."""
        height = x.shape[2]
        out = None
        for top in range(0, height, self.rows):
            bottom = min(top + self.rows, height)
            start, stop = max(top - halo, 0), min(bottom + halo, height)
            y = fn(x[:, :, start:stop])
            y = y[:, :, (top - start) * up:(bottom - start) * up]
            if out is None:
                out = x.new_empty((x.shape[0], y.shape[1], height * up, y.shape[3]), dtype=y.dtype)
            out[:, :, top * up:bottom * up] = y
        return out

    def _downsample(self, down, x: torch.Tensor) -> torch.Tensor:
        # Downsample2D pads one zero row/column at the bottom/right, then a 3x3 stride-2 conv.
        height = x.shape[2]
        out_height = (height - 2) // 2 + 1
        band_rows = max(self.rows // 2, 1)
        out = None
        for top in range(0, out_height, band_rows):
            bottom = min(top + band_rows, out_height)
            y = down(x[:, :, 2 * top:min(2 * bottom + 1, height)])[:, :, :bottom - top]
            if out is None:
                out = x.new_empty((x.shape[0], y.shape[1], out_height, y.shape[3]), dtype=y.dtype)
            out[:, :, top:bottom] = y
        return out

    def _norm_act(self, norm, act, x):
        stats = map_statistics(x, norm.num_groups, self.rows)
        return lambda band: act(group_norm(band, norm, stats))

    def _resnet(self, block, x: torch.Tensor) -> torch.Tensor:
        if block.time_emb_proj is not None or block.upsample is not None or block.downsample is not None:
            raise NotImplementedError("tiled VAE supports plain resnet blocks only")
        pre1 = self._norm_act(block.norm1, block.nonlinearity, x)
        hidden = self._local(lambda b: block.conv1(pre1(b)), x)
        pre2 = self._norm_act(block.norm2, block.nonlinearity, hidden)
        hidden = self._local(lambda b: block.conv2(block.dropout(pre2(b))), hidden)
        shortcut = x if block.conv_shortcut is None else self._local(block.conv_shortcut, x, halo=0)
        out = (shortcut + hidden) / block.output_scale_factor
        # The block never runs as a module here, so its forward hooks (StableSR's CFW) are called by hand.
        for hook in block._forward_hooks.values():
            changed = hook(block, (x,), out)
            out = out if changed is None else changed
        return out

    def _attention(self, attn, x: torch.Tensor) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is None:
            raise NotImplementedError("tiled VAE supports group-norm self-attention only")
        batch, channels, height, width = x.shape
        stats = map_statistics(x, attn.group_norm.num_groups, self.rows)

        def tokens(band):
            return group_norm(band, attn.group_norm, stats).flatten(2).transpose(1, 2)

        def heads(t):
            return t.reshape(batch, t.shape[1], attn.heads, -1).transpose(1, 2)

        keys, values = [], []
        for top in range(0, height, self.rows):
            normed = tokens(x[:, :, top:top + self.rows])
            keys.append(heads(attn.to_k(normed)))
            values.append(heads(attn.to_v(normed)))
        key, value = torch.cat(keys, 2), torch.cat(values, 2)
        del keys, values

        def attend(band):
            query = heads(attn.to_q(tokens(band)))
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            out = out.transpose(1, 2).reshape(batch, channels, band.shape[2], width)
            if attn.residual_connection:
                out = out + band
            return out / attn.rescale_output_factor

        return self._local(attend, x, halo=0)

    def _mid(self, mid, x):
        x = self._resnet(mid.resnets[0], x)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                x = self._attention(attn, x)
            x = self._resnet(resnet, x)
        return x

    def _head(self, x):
        net = self.net
        pre = self._norm_act(net.conv_norm_out, net.conv_act, x)
        return self._local(lambda b: net.conv_out(pre(b)), x)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = self._local(net.conv_in, image)
        for block in net.down_blocks:
            for resnet in block.resnets:
                x = self._resnet(resnet, x)
            for down in block.downsamplers or ():
                x = self._downsample(down, x)
        return self._head(self._mid(net.mid_block, x))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = self._local(net.conv_in, latent)
        x = self._mid(net.mid_block, x)
        for block in net.up_blocks:
            for resnet in block.resnets:
                x = self._resnet(resnet, x)
            for up in block.upsamplers or ():
                x = self._local(up, x, halo=1, up=2)
        return self._head(x)

