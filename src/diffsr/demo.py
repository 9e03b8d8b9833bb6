"""What `diffsr demo` runs on: the bundled example image and the tiny random test model, offline.

With no weights on the machine it builds the tiny random test model, so the output proves the
pipeline runs end to end; it is a smoke test, not an upscale. The command itself (an upscale of the
example) is in diffsr.cli, which uses this module and is not used by it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE = "example.png"
BANNER = ("SMOKE TEST: running OSEDiff with a tiny RANDOM model (no real weights on this machine).\n"
          "The output checks that the pipeline runs end to end; it is NOT an upscale.\n"
          "For real results (the released weights are fetched on first use): "
          "diffsr upscale IMAGE -o OUT --method osediff")


def example_path() -> Path:
    return Path(str(resources.files("diffsr") / "data" / EXAMPLE))


def default_models() -> Path:
    """Where the tiny models are written unless --models says otherwise (the tiny training configs use it too)."""
    return Path.home() / ".cache" / "diffsr" / "tiny"


def ensure_tiny_models(folder: Path) -> tuple[Path, Path]:
    """Write the tiny base and osediff.pkl once; later runs reuse them."""
    from diffsr.testing import make_tiny_base, make_tiny_weights

    base, weights = folder / "sd21-tiny", folder / "osediff.pkl"
    if not (base / "model_index.json").exists():
        make_tiny_base(base)
    if not weights.exists():
        make_tiny_weights("osediff", base, weights)
    return base, weights
