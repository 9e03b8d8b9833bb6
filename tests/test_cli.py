import numpy as np
import pytest
from PIL import Image

from diffsr.cli import main
from conftest import smooth_image


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(smooth_image(12, 14)).save(folder / "a.png")
    Image.fromarray(smooth_image(10, 10, seed=1)).save(folder / "b.jpg")
    (folder / "broken.png").write_text("not an image")
    return folder


def model_args(tiny_base, osediff_weights):
    return ["--method", "osediff", "--base", str(tiny_base), "--weights", str(osediff_weights), "--quiet"]


def test_folder_with_a_bad_file_writes_the_others_and_exits_1(inputs, tmp_path, tiny_base, osediff_weights, capsys):
    out = tmp_path / "out"
    code = main(["upscale", str(inputs), "-o", str(out), "--scale", "8"] + model_args(tiny_base, osediff_weights))
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg"]
    assert Image.open(out / "a.png").size == (112, 96)
    err = capsys.readouterr().err
    assert "broken.png: not an image" in err and err.count("error:") == 1


def test_existing_outputs_are_kept_unless_overwrite(inputs, tmp_path, tiny_base, osediff_weights, capsys):
    out = tmp_path / "out"
    out.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(out / "a.webp")
    args = ["upscale", str(inputs / "a.png"), "-o", str(out), "--scale", "8", "--format", "webp"]
    assert main(args + model_args(tiny_base, osediff_weights)) == 0
    assert Image.open(out / "a.webp").size == (4, 4)
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"] + model_args(tiny_base, osediff_weights)) == 0
    assert Image.open(out / "a.webp").size == (112, 96)


def test_usage_errors_exit_2(tmp_path, tiny_base, osediff_weights, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["upscale", "x.png", "-o", str(tmp_path), "--color-fix", "sepia"])
    assert exit_info.value.code == 2
    assert main(["upscale", str(tmp_path), "-o", str(tmp_path / "o"), "--method", "esrgan"]) == 2
    assert "unknown method 'esrgan'" in capsys.readouterr().err
    assert main(["upscale", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--base", str(tiny_base),
                 "--weights", str(tmp_path / "missing.pkl")]) == 2
    assert "missing.pkl: weights file not found" in capsys.readouterr().err


def test_missing_input_is_reported_and_others_written(tmp_path, tiny_base, osediff_weights, capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    code = main(["upscale", str(tmp_path / "x.png"), str(tmp_path / "gone.png"), "-o", str(out), "--scale", "8"]
                + model_args(tiny_base, osediff_weights))
    assert code == 1 and (out / "x.png").exists()
    assert "gone.png: no such file" in capsys.readouterr().err


def test_two_inputs_with_one_output_name_are_not_overwritten(tmp_path, tiny_base, osediff_weights, capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    Image.fromarray(smooth_image(8, 8, seed=3)).save(tmp_path / "x.jpg")
    out = tmp_path / "out"
    code = main(["upscale", str(tmp_path / "x.png"), str(tmp_path / "x.jpg"), "-o", str(out), "--scale", "8",
                 "--format", "png"] + model_args(tiny_base, osediff_weights))
    assert code == 1 and [p.name for p in out.iterdir()] == ["x.png"]
    assert "would overwrite the output of" in capsys.readouterr().err


def test_methods_lists_osediff(capsys):
    assert main(["methods"]) == 0
    assert "osediff" in capsys.readouterr().out.split()


def test_demo_runs_offline_and_says_it_is_a_smoke_test(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--models", str(tmp_path / "models"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "SMOKE TEST" in err and "NOT an upscale" in err
    assert Image.open(tmp_path / "demo" / "example.png").size == (512, 384)
