"""Weights files are untrusted: no code from a file ever runs, in any role a file can be given (issue 16).

A payload is an object whose pickle calls `exec` to write a marker file: the marker exists afterwards exactly
when the file was unpickled fully. Real-format files come from diffsr.testing; the payload is added to them.
"""

import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

import diffsr
from diffsr.checkpoints import read_weights
from diffsr.cli import main
from diffsr.errors import WeightsError
from metric_helpers import metric_weights  # noqa: F401  (fixture)


class Payload:
    """Unpickles as a call to exec that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


# Stand-ins for what Lightning checkpoints pickle by class reference (found by import when unpickled fully).
class DictConfig:
    """Like OmegaConf's DictConfig: pickles its content through __getstate__."""

    def __init__(self, content: dict):
        self._content = content

    def __getstate__(self):
        return {"_content": self._content, "_metadata": ("flags", 3)}

    def __setstate__(self, state):
        self.__dict__.update(state)


class ModelCheckpoint:
    def __init__(self):
        self.dirpath, self.monitor, self.best_model_score = "logs/ckpt", "val/loss", torch.tensor(0.25)


class AttributeDict(dict):
    """Like Lightning's hparams dict: a dict subclass (pickled as an object plus its items)."""


class Milestones(list):
    pass


def poison(path: Path, marker: Path) -> Path:
    """Add a payload to a real-format file (a dict), in place."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    data["evil"] = Payload(marker)
    torch.save(data, path)
    return path


def copy_poisoned(source: Path, target: Path, marker: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return poison(target, marker)


@pytest.fixture(scope="module")
def stablesr_files(stablesr_weights):
    return stablesr_weights, stablesr_weights.parent / "vqgan_cfw_00011.ckpt"


def test_the_payload_is_live(tmp_path, osediff_weights):
    """The check below means something: full unpickling of a poisoned file does write the marker."""
    marker = tmp_path / "ran"
    poisoned = copy_poisoned(osediff_weights, tmp_path / "osediff.ckpt", marker)
    torch.load(poisoned, weights_only=False)
    assert marker.read_text() == "ran"


ROLES = ["stablesr --weights", "--cfw-weights", "vqgan_cfw_00011.ckpt beside --weights", "ccsr v1 --weights",
         "osediff .ckpt --weights", "s3diff --de-net", "convert"]


@pytest.mark.parametrize("role", ROLES)
def test_a_payload_never_runs(role, tmp_path, tiny_base, stablesr_files, ccsr_v1_weights, osediff_weights,
                              s3diff_weights):
    """Each role through what `diffsr upscale --weights/--cfw-weights/--de-net` calls (load_upscaler), and
    `diffsr convert` through the CLI."""
    marker, folder = tmp_path / "ran", tmp_path / "files"
    stablesr_main, stablesr_cfw = stablesr_files
    if role == "convert":
        weights = copy_poisoned(stablesr_main, folder / "stablesr_000117.ckpt", marker)
        code = main(["convert", str(weights), "-o", str(tmp_path / "converted"), "--base", str(tiny_base)])
        assert not marker.exists()
        assert code == 0 and (tmp_path / "converted" / "stablesr_000117.safetensors").is_file()
        return
    if role == "stablesr --weights":
        weights = copy_poisoned(stablesr_main, folder / "stablesr_000117.ckpt", marker)
        shutil.copyfile(stablesr_cfw, folder / stablesr_cfw.name)
        method, options = "stablesr", {"weights": weights}
    elif role == "--cfw-weights":
        cfw = copy_poisoned(stablesr_cfw, folder / "my_cfw.ckpt", marker)
        method, options = "stablesr", {"weights": stablesr_main, "cfw_weights": cfw}
    elif role == "vqgan_cfw_00011.ckpt beside --weights":
        copy_poisoned(stablesr_cfw, folder / stablesr_cfw.name, marker)
        shutil.copyfile(stablesr_main, folder / stablesr_main.name)
        method, options = "stablesr", {"weights": folder / stablesr_main.name}
    elif role == "ccsr v1 --weights":
        method, options = "ccsr", {"weights": copy_poisoned(ccsr_v1_weights, folder / "real-world_ccsr.ckpt", marker)}
    elif role == "osediff .ckpt --weights":
        method, options = "osediff", {"weights": copy_poisoned(osediff_weights, folder / "osediff.ckpt", marker)}
        for tagger_file in ("ram_swin_large_14m.pth", "DAPE.pth"):  # its default tagger's, found beside it
            shutil.copyfile(osediff_weights.parent / tagger_file, folder / tagger_file)
    else:
        de_net = copy_poisoned(s3diff_weights.parent / "de_net.pth", folder / "de_net.ckpt", marker)
        method, options = "s3diff", {"weights": s3diff_weights, "de_net": de_net}
    if role == "s3diff --de-net":  # a plain state dict: the extra entry is named, in one line
        with pytest.raises(WeightsError, match="de_net.ckpt: not DEResNet degradation estimator weights: 1 "
                                               "unexpected entries .e.g. 'evil'.$"):
            diffsr.load_upscaler(method, base=tiny_base, **options)
    else:  # the file loads, its foreign object ignored
        assert diffsr.load_upscaler(method, base=tiny_base, **options).name == method
    assert not marker.exists()


def test_a_payload_in_train_set_weights_never_runs(tmp_path, tiny_base, osediff_weights, metric_weights):
    """`diffsr train CONFIG --set weights=FILE`: the config as the CLI reads it, then the trainer it builds
    (where the weights are read; the training steps after that are not needed here)."""
    from diffsr.training import trainer_class
    from diffsr.training.config import load_config

    marker = tmp_path / "ran"
    weights = copy_poisoned(osediff_weights, tmp_path / "osediff.ckpt", marker)
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump({
        "method": "osediff", "base": str(tiny_base), "output_dir": str(tmp_path / "run"),
        "data": {"hr": [str(tmp_path)], "crop": 64}, "train": {"steps": 1, "log_with": "none"},
        "method_args": {"lpips_weights": str(metric_weights)}}))
    config = load_config(file, {"weights": str(weights)})
    assert Path(config.weights) == weights
    trainer_class(config.method, config.stage).from_config(config)
    assert not marker.exists()


def lightning_checkpoint(state_dict: dict, marker: Path) -> dict:
    """What a Lightning 1.x trainer saves: the state dict plus hyper-parameters, callbacks, loops (and here
    a payload)."""
    return {
        "epoch": 3, "global_step": 117, "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {ModelCheckpoint: {"best_model_path": "logs/best.ckpt"}, "ModelCheckpoint{}": ModelCheckpoint()},
        "hyper_parameters": AttributeDict(config=DictConfig({"model": {"lr": 5e-5}}), steps=Milestones([10, 20])),
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 5e-5, "params": [0]}]}],
        "lr_schedulers": [OrderedDict(last_epoch=116)],
        "extras": {"names": {"a", "b"}, "raw": b"\x00\x01", "pair": (1, 2.5), "complex": 1 + 2j},
        "evil": Payload(marker),
    }


def test_a_lightning_checkpoint_loads_with_its_state_dict(tmp_path, tiny_base, stablesr_files):
    marker = tmp_path / "ran"
    state = torch.load(stablesr_files[0], weights_only=True)["state_dict"]
    path = tmp_path / "stablesr_000117.ckpt"
    torch.save(lightning_checkpoint(state, marker), path)
    shutil.copyfile(stablesr_files[1], tmp_path / stablesr_files[1].name)

    loaded = read_weights(path)
    assert not marker.exists()
    assert loaded["state_dict"].keys() == state.keys()
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state.items())
    assert loaded["global_step"] == 117 and loaded["optimizer_states"][0]["state"][0]["exp_avg"].tolist() == [1, 1]
    assert loaded["extras"] == {"names": {"a", "b"}, "raw": b"\x00\x01", "pair": (1, 2.5), "complex": 1 + 2j}
    assert loaded["lr_schedulers"] == [OrderedDict(last_epoch=116)]
    # The foreign objects are inert placeholders: none is an instance of the class the file names.
    for value in (loaded["hyper_parameters"], loaded["callbacks"]["ModelCheckpoint{}"], loaded["evil"]):
        assert not isinstance(value, (DictConfig, ModelCheckpoint, AttributeDict, dict))
        assert not callable(value)
    assert "DictConfig" in repr(loaded["hyper_parameters"].dict_items["config"])
    # ... and the model loads from it.
    model = diffsr.load_upscaler("stablesr", base=tiny_base, weights=path)
    assert model.name == "stablesr"
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_a_pkl_or_pth_with_objects_is_refused_as_such(suffix, tmp_path, osediff_weights):
    marker = tmp_path / "ran"
    poisoned = copy_poisoned(osediff_weights, tmp_path / f"osediff{suffix}", marker)
    with pytest.raises(WeightsError) as error:
        read_weights(poisoned)
    message = str(error.value)
    assert message.startswith(f"{poisoned}: holds pickled objects diffsr will not unpickle")
    assert "exec" in message and "corrupt" not in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pkl", ".ckpt"])
def test_a_truncated_file_is_called_corrupt(suffix, tmp_path, osediff_weights):
    data = osediff_weights.read_bytes()
    for size in (0, 100, len(data) // 2):
        path = tmp_path / f"cut{size}{suffix}"
        path.write_bytes(data[:size])
        with pytest.raises(WeightsError, match=rf"cut{size}\{suffix}: not a readable weights file, corrupt or "
                                               "truncated"):
            read_weights(path)


def test_a_torchscript_archive_is_not_run(tmp_path):
    """torch.load hands TorchScript archives to torch.jit.load; a weights file never goes there."""
    module = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "model.ckpt"
    torch.jit.save(module, str(path))
    with pytest.raises(WeightsError, match="model.ckpt: a TorchScript archive .a program., not a weights file"):
        read_weights(path)


class SystemPayload:
    """os.system (a module torch blocks even when asked to allow it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def tensor_carrying(payload):
    tensor = torch.ones(3)
    tensor.note = payload  # pickled through torch._tensor._rebuild_from_type_v2 with the tensor's __dict__
    return tensor


@pytest.mark.parametrize("gadget", ["exec", "os.system", "protocol 4", "inside a tensor", "as a dict key"])
def test_no_gadget_runs_from_a_ckpt(gadget, tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "model.ckpt"
    weights = {"model.w": torch.arange(6.0).reshape(2, 3)}
    payload = SystemPayload(marker) if gadget == "os.system" else Payload(marker)
    extra = {"inside a tensor": tensor_carrying(payload), "as a dict key": {payload: 1}}.get(gadget, payload)
    torch.save({"state_dict": weights, "extra": extra}, path, pickle_protocol=4 if gadget == "protocol 4" else 2)
    loaded = read_weights(path)
    assert not marker.exists()
    assert torch.equal(loaded["state_dict"]["model.w"], weights["model.w"])


class Rot13:
    def __reduce__(self):
        import codecs

        return codecs.encode, ("text", "rot13")


def test_only_the_bytes_codec_is_admitted(tmp_path):
    """Protocol 2 writes bytes as _codecs.encode(text, 'latin1'): that call works, no other codec is looked up."""
    path = tmp_path / "model.ckpt"
    torch.save({"raw": b"\xff\x00", "config": DictConfig({})}, path)
    assert read_weights(path)["raw"] == b"\xff\x00"
    torch.save({"other": Rot13(), "config": DictConfig({})}, path)
    with pytest.raises(WeightsError, match="model.ckpt: not a readable weights file.*'rot13'"):
        read_weights(path)


def test_upscale_cli_with_a_poisoned_ckpt_writes_the_image(tmp_path, tiny_base, osediff_weights):
    from PIL import Image

    marker = tmp_path / "ran"
    weights = copy_poisoned(osediff_weights, tmp_path / "osediff.ckpt", marker)
    Image.new("RGB", (10, 12), (120, 90, 60)).save(tmp_path / "a.png")
    code = main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--method", "osediff",
                 "--base", str(tiny_base), "--weights", str(weights), "--tagger", "none", "--quiet"])
    assert code == 0 and (tmp_path / "out" / "a.png").is_file()
    assert not marker.exists()


@pytest.mark.parametrize("form", ["legacy torch format .ckpt", "raw pickle .pkl"])
def test_objects_outside_a_torch_zip_are_refused(form, tmp_path):
    import pickle

    marker = tmp_path / "ran"
    content = {"state_dict": {"w": torch.ones(2)}, "evil": Payload(marker)}
    if form.startswith("legacy"):
        path = tmp_path / "model.ckpt"
        torch.save(content, path, _use_new_zipfile_serialization=False)
    else:
        path = tmp_path / "model.pkl"
        path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(WeightsError, match=r"model\.(ckpt|pkl): holds pickled objects diffsr will not unpickle"):
        read_weights(path)
    assert not marker.exists()
