"""`diffsr demo`: the whole pipeline on the bundled example image, offline.

With no weights on the machine it builds the tiny random test model, so the output proves the
pipeline runs end to end; it is a smoke test, not an upscale.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

EXAMPLE = "example.png"


def example_path() -> Path:
    return Path(str(resources.files("diffsr") / "data" / EXAMPLE))


def ensure_tiny_models(folder: Path) -> tuple[Path, Path]:
    """Write the tiny base and osediff.pkl once; later runs reuse them."""
    from diffsr.testing import make_tiny_base, make_tiny_weights

    base, weights = folder / "sd21-tiny", folder / "osediff.pkl"
    if not (base / "model_index.json").exists():
        make_tiny_base(base)
    if not weights.exists():
        make_tiny_weights("osediff", base, weights)
    return base, weights


def run_demo(output: Path, models: Path | None = None, quiet: bool = False) -> int:
    from diffsr.cli import main

    models = models or Path.home() / ".cache" / "diffsr" / "tiny"
    banner = ("SMOKE TEST: running OSEDiff with a tiny RANDOM model (no real weights on this machine).\n"
              "The output checks that the pipeline runs end to end; it is NOT an upscale.\n"
              "For real results (the released weights are fetched on first use): "
              "diffsr upscale IMAGE -o OUT --method osediff")
    print(banner, file=sys.stderr)
    base, weights = ensure_tiny_models(models)
    argv = ["upscale", str(example_path()), "-o", str(output), "--method", "osediff", "--base", str(base),
            "--weights", str(weights), "--scale", "4", "--overwrite"] + (["--quiet"] if quiet else [])
    code = main(argv)
    if code == 0:
        print(f"smoke test passed: {output / EXAMPLE} (random-model output, not an upscale)", file=sys.stderr)
    return code
