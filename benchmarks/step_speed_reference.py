"""The authors' side of benchmarks/step_speed.py: seconds per sampling step of their networks (release config,
random weights) at a square latent, on CPU. Prints one JSON line.

- stablesr: UNetModelDualcondV2 + EncoderUNetModelWT (github:IceClear/StableSR; STABLESR_SRC, needs omegaconf)
- ccsr: CCSR v1's ControlNet + ControlledUnetModel as ControlLDM.apply_model calls them (github:csslc/CCSR;
  CCSR_SRC), configs/model/ccsr_stage2.yaml's shapes

Runs in a venv with torch (same version), numpy, omegaconf, einops, tqdm (not diffsr's): the fixture makers'
import stand-ins, at the release's 32 GroupNorm groups, supply what the networks' modules import but never call.

    python step_speed_reference.py METHOD STEPS THREADS LATENT
"""

import json
import os
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
SD21 = dict(image_size=32, in_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
            channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
            use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, legacy=False)


def stablesr_step():
    os.environ.setdefault("STABLESR_GROUPS", "32")  # full size: the release's GroupNorm32
    sys.path.insert(0, str(FIXTURES / "stablesr"))
    import make_reference  # noqa: F401  (installs the import stubs; no tiny settings at 32 groups)
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    unet = instantiate_from_config(OmegaConf.create(dict(
        target="ldm.modules.diffusionmodules.openaimodel.UNetModelDualcondV2",
        params=dict(SD21, out_channels=4, use_checkpoint=False, semb_channels=256)))).eval()
    encoder = instantiate_from_config(OmegaConf.create(dict(
        target="ldm.modules.diffusionmodules.openaimodel.EncoderUNetModelWT", params=dict(
            image_size=96, in_channels=4, model_channels=256, out_channels=256, num_res_blocks=2,
            attention_resolutions=[4, 2, 1], dropout=0, channel_mult=[1, 1, 2, 2], conv_resample=True, dims=2,
            use_checkpoint=False, use_fp16=False, num_heads=4, num_head_channels=-1, num_heads_upsample=-1,
            use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False)))).eval()
    return lambda x, t, lr_latent, text: unet(x, t, context=text, struct_cond=encoder(lr_latent, t))


def ccsr_step():
    sys.path.insert(0, str(FIXTURES / "ccsr"))
    import make_v1_release_run as harness

    harness.GROUPS = 32  # full size: the release's GroupNorm32
    stage2 = harness.import_release()
    config = dict(SD21, use_checkpoint=True)  # as the yaml (a no-op without gradients)
    control_model = stage2.ControlNet(**config, hint_channels=4).eval()
    unet = stage2.ControlledUnetModel(**config, out_channels=4).eval()

    def step(x, t, lr_latent, text):  # ControlLDM.apply_model with c_latent given, control scales 1
        control = control_model(x=x, hint=lr_latent, timesteps=t, context=text)
        return unet(x=x, timesteps=t, context=text, control=control, only_mid_control=False)
    return step


def main(method: str, steps: int, threads: int, latent: int):
    import torch

    torch.manual_seed(0)
    step = {"stablesr": stablesr_step, "ccsr": ccsr_step}[method]()
    torch.set_num_threads(threads)  # after the imports: the StableSR fixture maker sets one thread
    x = torch.randn(1, 4, latent, latent)
    lr_latent = torch.randn(1, 4, latent, latent)
    text = torch.randn(1, 77, 1024)
    times = []
    with torch.no_grad():
        for index in range(steps + 1):  # the first call warms up
            t = torch.tensor([999 - index])
            start = time.perf_counter()
            eps = step(x, t, lr_latent, text)
            x = x - 0.01 * eps  # stands for the posterior update (negligible next to the networks)
            times.append(time.perf_counter() - start)
    print(json.dumps({"seconds_per_step": sorted(times[1:])[len(times[1:]) // 2], "times": times}))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
