"""Readers for the authors' weight files, and `detect`: which method a file belongs to."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from diffsr.checkpoints import restricted_pickle
from diffsr.errors import WeightsError, first_line

# Top-level keys that identify each release format (a file matches when it has all of them).
_SIGNATURES = {
    "osediff": ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "state_dict_unet", "state_dict_vae"),
    "s3diff": ("unet_lora_target_modules", "vae_lora_target_modules", "state_dict_unet", "w"),
}
# State-dict key prefixes of the LDM (Lightning) checkpoints.
_PREFIXES = {
    "ccsr": ("control_model.",),
    "stablesr": ("structcond_stage_model.", "decoder.fusion_layer_1", "first_stage_model.decoder.fusion_layer_1"),
}


def read_weights(path: str | Path) -> dict:
    """Load a .pkl/.pth/.ckpt (torch pickle) or .safetensors file as a dict, with one clear error line."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises several private error types
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
    with path.open("rb") as file:  # one open file: every read below sees the same bytes
        try:
            members = _zip_members(file)
            if any(name.endswith("constants.pkl") for name in members or ()):  # torch.load would run it
                raise WeightsError(f"{path}: a TorchScript archive (a program), not a weights file")
            file.seek(0)
            try:
                data = torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                # Lightning checkpoints pickle a few non-tensor objects (hyper-parameters, callbacks): they
                # become inert placeholders. Other files never hold any, so one that does is refused.
                if path.suffix != ".ckpt" or members is None:
                    raise WeightsError(_unpickling_problem(path, error)) from None
                file.seek(0)
                # Not full unpickling: weights_only=False only lets torch take our pickle module, whose find_class
                # is the one door for every class and function the file names (tensors and plain values pass,
                # anything else becomes an inert placeholder; see restricted_pickle).
                data = torch.load(file, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
            reason = first_line(error)
            raise WeightsError(f"{path}: not a readable weights file, corrupt or truncated ({reason})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict of weights, found {type(data).__name__}")
    return data


def _zip_members(file) -> list[str] | None:
    """The member names when `file` is a zip archive (torch.save's format), else None (torch's legacy
    format, a raw pickle, or damage)."""
    file.seek(0)
    if not zipfile.is_zipfile(file):
        return None
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        return archive.namelist()


def _unpickling_problem(path: Path, error: pickle.UnpicklingError) -> str:
    """Why torch's weights_only loader refused a file, in one line: foreign objects, or damage."""
    foreign = re.search(r"GLOBAL (\S+)", str(error))  # how torch names a class or function it will not load
    if foreign:
        return (f"{path}: holds pickled objects diffsr will not unpickle ({foreign[1]}); weights files may hold "
                "only tensors and plain values")
    return f"{path}: not a readable weights file, corrupt or truncated ({first_line(error)})"


def detect(weights: dict) -> str | None:
    """The method whose release format `weights` has, or None."""
    for method, keys in _SIGNATURES.items():
        if all(key in weights for key in keys):
            return method
    state = weights.get("state_dict", weights)
    if isinstance(state, dict):
        names = [k for k in state if isinstance(k, str)]
        for method, prefixes in _PREFIXES.items():
            if any(name.startswith(prefixes) for name in names):
                return method
    return None


def find_beside(weights: str | Path, *names: str) -> Path | None:
    """The first of `names` that is a file in the folder of the file `weights` (a release's companion files:
    S3Diff's de_net.pth, StableSR's CFW autoencoder, the tagger's files), or None."""
    for name in names:
        if (Path(weights).parent / name).is_file():
            return Path(weights).parent / name
    return None


def read_method_weights(path: str | Path, method: str) -> dict:
    """read_weights + a check that the file is `method`'s release format."""
    weights = read_weights(path)
    found = detect(weights)
    if found != method:
        what = f"a {found} checkpoint" if found else "not a known release format"
        raise WeightsError(f"{path}: this is {what}, not {method} weights")
    return weights
