"""The authors' side of benchmarks/stablesr_step_speed.py: seconds per sampling step of their
UNetModelDualcondV2 + EncoderUNetModelWT (release config, random weights) at a 64x64 latent, on CPU.

Runs in a venv that has torch==2.13.0, numpy, omegaconf, einops, tqdm (not diffsr's), with
STABLESR_SRC pointing at a checkout of github:IceClear/StableSR. Prints one JSON line.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("STABLESR_GROUPS", "32")  # full size: the release's GroupNorm32
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "stablesr"))
import make_reference  # noqa: E402  (installs the import stubs; uses no tiny settings at 32 groups)
import torch  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def main(steps: int, threads: int, latent: int):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = instantiate_from_config(OmegaConf.create(dict(
        target="ldm.modules.diffusionmodules.openaimodel.UNetModelDualcondV2", params=dict(
            image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
            use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, use_checkpoint=False,
            legacy=False, semb_channels=256)))).eval()
    encoder = instantiate_from_config(OmegaConf.create(dict(
        target="ldm.modules.diffusionmodules.openaimodel.EncoderUNetModelWT", params=dict(
            image_size=96, in_channels=4, model_channels=256, out_channels=256, num_res_blocks=2,
            attention_resolutions=[4, 2, 1], dropout=0, channel_mult=[1, 1, 2, 2], conv_resample=True, dims=2,
            use_checkpoint=False, use_fp16=False, num_heads=4, num_head_channels=-1, num_heads_upsample=-1,
            use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False)))).eval()
    x = torch.randn(1, 4, latent, latent)
    lr_latent = torch.randn(1, 4, latent, latent)
    text = torch.randn(1, 77, 1024)
    times = []
    with torch.no_grad():
        for step in range(steps + 1):  # the first call warms up
            t = torch.tensor([999 - step])
            start = time.perf_counter()
            maps = encoder(lr_latent, t)
            eps = unet(x, t, context=text, struct_cond=maps)
            x = x - 0.01 * eps  # stands for the posterior update (negligible next to the networks)
            times.append(time.perf_counter() - start)
    print(json.dumps({"seconds_per_step": sorted(times[1:])[len(times[1:]) // 2], "times": times,
                      "params": sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in encoder.parameters())}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
