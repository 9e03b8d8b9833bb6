"""Regenerate this example: a benchmark report from the tiny random test models on a small synthetic set.

    PYTHONPATH=src python examples/benchmark-tiny/make_example.py

It writes a synthetic GT/LR set (shapes, gradients, stripes; LR = bicubic x1/4), the tiny SD base and
random OSEDiff weights, then runs `diffsr benchmark` with OSEDiff and the bicubic baseline. The OSEDiff
model is random, so its images are noise-like: the example shows the report, not an upscaler.
Metrics that need weight files (LPIPS, DISTS, FID) or pyiqa (MUSIQ, MANIQA, CLIPIQA) are listed as not
computed on a machine without them, with what to get.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def scene(seed: int, size: int = 128) -> Image.Image:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([120 + 100 * x, 90 + 120 * y, 200 - 120 * x * y], axis=2)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        cx, cy, r = rng.randint(10, size - 10), rng.randint(10, size - 10), rng.randint(6, 24)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.randint(0, 256, 3)))
    for i in range(0, size, 6):
        draw.line([(i, size - 24), (i + 3, size - 4)], fill=(30, 30, 30), width=2)
    return image


def main() -> int:
    from diffsr.cli import main as diffsr
    from diffsr.testing import make_tiny_base, make_tiny_weights

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        lr, gt = scratch / "lr", scratch / "gt"
        lr.mkdir()
        gt.mkdir()
        for k in range(3):
            image = scene(k)
            image.save(gt / f"scene{k}.png")
            image.resize((32, 32), Image.BICUBIC).save(lr / f"scene{k}.png")
        base = make_tiny_base(scratch / "sd-tiny")
        weights = make_tiny_weights("osediff", base, scratch / "osediff.pkl")
        code = diffsr(["benchmark", "--methods", "osediff,bicubic", "--lr", str(lr), "--gt", str(gt),
                       "-o", str(scratch / "out"), "--base", str(base), "--weights", f"osediff={weights}",
                       "--metrics", "psnr,ssim,lpips,dists,niqe,fid,musiq,maniqa,clipiqa", "--offline",
                       "--title", "diffsr benchmark example (tiny random models, synthetic images)"])
        for name in ("report.html", "results.md", "results.csv", "results.json"):
            text = (scratch / "out" / name).read_text().replace(str(scratch), "$TMP")
            (HERE / name).write_text(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
