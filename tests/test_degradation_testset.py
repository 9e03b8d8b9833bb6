"""`diffsr degrade`: paired test sets, their parameter record, resuming, bad inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.cli import main
from diffsr.degradation import apply_degradation, load_config
from diffsr.images import read_image


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_hr(folder, name, size, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((size[1], size[0]), Image.BICUBIC).save(folder / name)


@pytest.fixture
def hr_dir(tmp_path):
    folder = tmp_path / "hr_in"
    folder.mkdir()
    _write_hr(folder, "a.png", (80, 96), 0)
    _write_hr(folder, "b.png", (72, 72), 1)
    _write_hr(folder, "tiny.png", (40, 40), 2)  # smaller than the crop: skipped
    (folder / "junk.png").write_bytes(b"not an image at all")  # unreadable: reported
    return folder


def _run(hr_dir, out, *extra):
    return main(["degrade", str(hr_dir), "-o", str(out), "--crop", "64", "--count", "5", "--seed", "3",
                 "--quiet", *extra])


def test_writes_pairs_and_a_record_that_remakes_them(hr_dir, tmp_path):
    out = tmp_path / "set"
    assert _run(hr_dir, out) == 0
    names = [f"{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in (out / "hr").iterdir()) == names
    assert sorted(p.name for p in (out / "lr").iterdir()) == names
    assert Image.open(out / "lr" / names[0]).size == (16, 16) and Image.open(out / "hr" / names[0]).size == (64, 64)
    record = json.loads((out / "pairs.json").read_text())
    assert record["sources"] == ["a.png", "b.png"] and len(record["pairs"]) == 5

    config = load_config(record["config"])
    for pair in record["pairs"]:
        top, left, size = pair["crop"]
        hr = read_image(hr_dir / pair["source"]).to_tensor()[:, :, top:top + size, left:left + size]
        assert torch.equal(read_image(out / "hr" / pair["name"]).to_tensor(), hr)
        lr, _ = apply_degradation(hr, [pair["params"]], config)
        assert torch.equal(read_image(out / "lr" / pair["name"]).to_tensor(), lr)


def test_resuming_gives_the_same_pairs(hr_dir, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _run(hr_dir, whole) == 0
    assert _run(hr_dir, resumed) == 0
    (resumed / "lr" / "00003.png").unlink()  # as if interrupted between HR and LR
    (resumed / "hr" / "00004.png").unlink()
    (resumed / "lr" / "00004.png").unlink()
    kept = (resumed / "lr" / "00001.png").stat().st_mtime_ns
    assert _run(hr_dir, resumed) == 0
    assert (resumed / "lr" / "00001.png").stat().st_mtime_ns == kept  # done pairs are not redone
    for part in ("hr", "lr"):
        for i in range(5):
            name = f"{i:05d}.png"
            assert (whole / part / name).read_bytes() == (resumed / part / name).read_bytes(), (part, name)


def test_other_seed_other_pairs_and_no_mixing_in_one_folder(hr_dir, tmp_path, capsys):
    out = tmp_path / "set"
    assert _run(hr_dir, out) == 0
    assert _run(hr_dir, tmp_path / "other", "--seed", "4") == 0
    assert (out / "lr" / "00000.png").read_bytes() != (tmp_path / "other" / "lr" / "00000.png").read_bytes()
    assert _run(hr_dir, out, "--seed", "4") == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_inputs_are_reported_not_fatal(hr_dir, tmp_path, capsys):
    # A file whose header reads but whose pixels are cut off: its pairs fail, the others are written.
    good = (hr_dir / "a.png").read_bytes()
    (hr_dir / "a.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "set"
    code = main(["degrade", str(hr_dir), "-o", str(out), "--crop", "64", "--count", "4"])
    err = capsys.readouterr().err
    assert code == 1
    assert "junk.png" in err and "1 image(s) smaller than 64 px" in err and "truncated" in err
    assert sorted(p.name for p in (out / "lr").iterdir()) == ["00002.png", "00003.png"]  # the pairs from b.png


def test_usage_errors(tmp_path, hr_dir):
    assert main(["degrade", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert main(["degrade", str(hr_dir), "-o", str(tmp_path / "o"), "--crop", "500"]) == 2  # nothing large enough
    assert main(["degrade", str(hr_dir), "-o", str(tmp_path / "o"), "--crop", "62"]) == 2  # not a multiple of 4
    assert main(["degrade", str(hr_dir), "-o", str(tmp_path / "o"), "--config", "nope"]) == 2
