"""One-time safetensors copies of the pickled releases (StableSR's and CCSR v1's Lightning .ckpt files),
made after a verified fetch from just the parts diffsr loads, so that later loads are fast and never unpickle.

The copy lives in $DIFFSR_HOME/converted/<item>/<release name>.safetensors; its sha256 is recorded beside it
when written, and a copy that no longer matches is made again from the (verified) release file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffsr.errors import WeightsError
from diffsr.weights.checks import check_file, diffsr_home, digest
from diffsr.weights.registry import FileSpec, Item

# The CCSR v1 tensors the loader reads (UNet, ControlNet, VAE, condition encoder); the OpenCLIP copy is not.
CCSR_V1_PREFIXES = ("model.diffusion_model.", "control_model.", "first_stage_model.", "cond_encoder.")


def converted_copy(item: Item, release: Path, base: Path, progress: bool = True, convert=None) -> Path:
    """The safetensors copy of `release` (item `item`, checked already), written once. `convert(release, base,
    out)`: the method's own writer (StableSR's Upscaler.convert_weights), passed in so that this package, which
    the methods use, does not import them back; CCSR v1's copy needs none."""
    from filelock import FileLock

    target = diffsr_home() / "converted" / item.name / (release.stem + ".safetensors")
    record = target.with_name(target.name + ".json")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _intact(target, record):
            return target
        if progress:
            print(f"diffsr: converting {release.name} to safetensors once ({target})", file=sys.stderr)
        temporary = target.with_name(target.name + ".tmp")
        _write(item, release, base, temporary, convert)
        value = digest(temporary, FileSpec(path=target.name, sha256="-"), progress)
        temporary.replace(target)
        record.write_text(json.dumps({"sha256": value, "from": str(release)}))
    return target


def _intact(target: Path, record: Path) -> bool:
    try:
        value = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return False
    return check_file(target, FileSpec(path=target.name, sha256=value)) is None


def _write(item: Item, release: Path, base: Path, out: Path, convert) -> None:
    if item.method != "ccsr":
        if convert is None:
            raise WeightsError(f"{item.name}: {release.name} is loaded from a converted copy; load it with "
                               "diffsr.load_upscaler, which passes the method's converter")
        convert(release, base, out)
        return
    from safetensors.torch import save_file

    from diffsr.checkpoints import read_weights

    raw = read_weights(release)
    state = raw.get("state_dict", raw)
    tensors = {key: value.contiguous() for key, value in state.items() if key.startswith(CCSR_V1_PREFIXES)}
    save_file(tensors, str(out), metadata={"format": "pt", "source": release.name})
