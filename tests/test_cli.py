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


def test_folder_with_a_bad_file_writes_the_others_and_exits_1(inputs, tmp_path, tiny_base, osediff_weights, capsys,
                                                              small_process_size):
    out = tmp_path / "out"
    code = main(["upscale", str(inputs), "-o", str(out), "--scale", "8"] + model_args(tiny_base, osediff_weights))
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg"]
    assert Image.open(out / "a.png").size == (112, 96)
    err = capsys.readouterr().err
    assert "broken.png: not an image" in err and err.count("error:") == 1


def test_existing_outputs_are_kept_unless_overwrite(inputs, tmp_path, tiny_base, osediff_weights, capsys,
                                                    small_process_size):
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


def test_missing_input_is_reported_and_others_written(tmp_path, tiny_base, osediff_weights, capsys,
                                                      small_process_size):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    code = main(["upscale", str(tmp_path / "x.png"), str(tmp_path / "gone.png"), "-o", str(out), "--scale", "8"]
                + model_args(tiny_base, osediff_weights))
    assert code == 1 and (out / "x.png").exists()
    assert "gone.png: no such file" in capsys.readouterr().err


def test_two_inputs_with_one_output_name_are_not_overwritten(tmp_path, tiny_base, osediff_weights, capsys,
                                                             small_process_size):
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


# -- checks that need no model: before it loads, exit 2, one line naming the flags typed ----------------------

@pytest.fixture()
def one_image(tmp_path):
    """A real image, and weights that do not exist: a check made after loading would fail on the weights instead."""
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    return ["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--base", str(tmp_path),
            "--weights", str(tmp_path / "missing.pkl")]


def usage_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("diffsr: error: "), err
    assert "missing.pkl" not in err and "Error" not in err and "unexpected keyword" not in err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--scale", "9"], "--scale 9.0 is out of range (choose 1 to 8)"),
    (["--scale", "0.5"], "--scale 0.5 is out of range"),
    (["--device", "tpu9"], "unknown --device 'tpu9'"),
    (["--fidelity", "0.5"], "--method osediff does not take --fidelity (a flag of stablesr)"),
    (["--steps", "4", "--t-max", "0.5"], "does not take --steps (a flag of ccsr, stablesr); --t-max (a flag of ccsr)"),
    (["--de-net", "d.pth"], "--method osediff does not take --de-net (a flag of s3diff)"),
    (["--method", "stablesr", "--merge-lora"], "--method stablesr does not take --merge-lora (a flag of osediff, s3diff)"),
    (["--method", "stablesr", "--no-merge-lora"], "--method stablesr does not take --merge-lora"),
    (["--method", "ccsr", "--degradation-blur", "0.5"],
     "--method ccsr does not take --degradation-blur/--degradation-noise (a flag of s3diff)"),
    (["--method", "stablesr", "--sample-posterior"], "does not take --sample-posterior (a flag of ccsr, osediff, s3diff)"),
    (["--max-memory", "0"], "--max-memory 0.0 GB must be positive"),
    (["--tile-size", "64", "--tile-overlap", "64"], "--tile-size 64 must be larger than --tile-overlap 64"),
])
def test_flag_errors_come_before_loading_and_name_the_flags(one_image, flags, message, capsys, tmp_path):
    assert message in usage_error(one_image + flags, capsys)
    assert not (tmp_path / "out").exists()


def test_unavailable_cuda_is_a_usage_error_before_loading(one_image, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "--device 'cuda' is not available" in usage_error(one_image + ["--device", "cuda"], capsys)


def test_bad_dtype_is_refused_by_name(one_image, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(one_image + ["--dtype", "float8"])
    assert exit_info.value.code == 2 and "--dtype: invalid choice: 'float8'" in capsys.readouterr().err


def test_knob_values_checked_after_loading_name_the_flags(tmp_path, tiny_base, ccsr_v2_weights, capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    err = usage_error(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--method", "ccsr", "--quiet",
                       "--base", str(tiny_base), "--weights", str(ccsr_v2_weights), "--t-max", "0.4", "--t-min", "0.5"],
                      capsys)
    assert "--t-min (0.5) must be smaller than --t-max (0.4)" in err


def test_version(capsys):
    import diffsr

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"diffsr {diffsr.__version__}"


def test_methods_shows_variants_defaults_and_flags(capsys):
    from diffsr.weights import Registry

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    blocks = {block.split(":")[0]: block for block in ("\n" + out).split("\n") if block and not block.startswith(" ")}
    assert sorted(blocks) == ["ccsr", "osediff", "s3diff", "stablesr"]
    registry = Registry.load()
    for item in registry.items.values():
        if item.kind == "weights":  # every released variant is listed under its method, with its base
            line = next(line for line in out.splitlines() if line.strip().startswith(item.name + " "))
            assert item.variant in line and line.endswith(f"base {item.base}")
    assert "stablesr: default weights stablesr on base sd21-base" in out
    assert "s3diff: default weights s3diff on base sd-turbo" in out
    stablesr = out.split("stablesr: ")[1]
    assert "--fidelity" in stablesr and "--merge-lora" not in stablesr
    assert "--fidelity" not in out.split("osediff: ")[1].split("s3diff: ")[0]


@pytest.mark.parametrize("flags, given", [([], None), (["--merge-lora"], True), (["--no-merge-lora"], False)])
def test_merge_lora_flag_reaches_the_loader_and_merging_is_the_default(tmp_path, tiny_base, osediff_weights,
                                                                       monkeypatch, flags, given):
    import diffsr
    from peft.tuners.tuners_utils import BaseTunerLayer

    load, loaded = diffsr.load_upscaler, {}

    def recording_load(*args, **options):
        loaded["options"] = options
        loaded["upscaler"] = load(*args, **options, process_size=64)
        return loaded["upscaler"]

    monkeypatch.setattr(diffsr, "load_upscaler", recording_load)
    Image.fromarray(smooth_image(12, 12)).save(tmp_path / "a.png")
    args = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--tagger", "none"]
    assert main(args + model_args(tiny_base, osediff_weights) + flags) == 0
    assert loaded["options"].get("merge_lora") == given
    unet = loaded["upscaler"].backbone.unet
    layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
    assert layers and all(layer.merged is (given is not False) for layer in layers)


def test_float16_on_cpu_warns_and_suggests_bfloat16(tmp_path, capsys):
    args = ["upscale", str(tmp_path), "-o", str(tmp_path / "out"), "--dtype", "float16"]
    assert main(args) == 2  # an empty folder: the warning comes before that
    err = capsys.readouterr().err
    assert "warning: --dtype float16 on the CPU is very slow" in err and "--dtype bfloat16" in err
    main(args[:-2] + ["--dtype", "bfloat16"])
    assert "warning" not in capsys.readouterr().err


# -- progress -----------------------------------------------------------------------------------------------

@pytest.fixture()
def small_process_size(monkeypatch):
    """The methods' load option process_size=64 under the CLI: inputs are not enlarged to 512 px (the CLI's own
    behaviour is unchanged; the tests run in seconds instead of half a minute each)."""
    import diffsr

    load = diffsr.load_upscaler
    monkeypatch.setattr(diffsr, "load_upscaler", lambda *args, **options: load(*args, **options, process_size=64))


class Terminal:
    """stderr as a terminal (capsys's is not one)."""

    def __init__(self):
        import io

        self.text = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.text.write(text)

    def flush(self):
        pass


def progress_run(args, monkeypatch, capsys, terminal=False):
    if terminal:
        stream = Terminal()
        monkeypatch.setattr("sys.stderr", stream)
        assert main(args) == 0
        monkeypatch.undo()
        return stream.text.getvalue()
    assert main(args) == 0
    return capsys.readouterr().err


@pytest.mark.parametrize("terminal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_one_step_methods_show_no_pass_count(tmp_path, tiny_base, osediff_weights, small_process_size, terminal,
                                             monkeypatch, capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    args = ["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--scale", "2", "--base", str(tiny_base),
            "--weights", str(osediff_weights)]
    monkeypatch.setattr("diffsr.cli._PassProgress.PLAIN_EVERY", 0.0)
    err = progress_run(args, monkeypatch, capsys, terminal)
    assert "pass" not in err and "wrote 1 image(s)" in err
    if terminal:
        assert "\r" in err and "osediff x2" in err  # the image bar
    else:  # not a terminal: plain lines only
        assert "\r" not in err and "\x1b" not in err
        assert "diffsr: [1/1] x.png: upscaled in " in err


@pytest.mark.parametrize("terminal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_multi_step_progress_counts_passes(tmp_path, tiny_base, ccsr_v2_weights, small_process_size, terminal,
                                           monkeypatch, capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    args = ["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--scale", "2", "--method", "ccsr",
            "--base", str(tiny_base), "--weights", str(ccsr_v2_weights), "--steps", "10", "--t-max", "0.5",
            "--t-min", "0.2"]  # 4 denoiser passes
    monkeypatch.setattr("diffsr.cli._PassProgress.PLAIN_EVERY", 0.0)
    err = progress_run(args, monkeypatch, capsys, terminal)
    if terminal:
        assert "denoiser passes" in err
    else:
        assert "\r" not in err and "\x1b" not in err
        lines = [line for line in err.splitlines() if "denoiser passes" in line]
        assert lines == [f"diffsr: x.png: {n} denoiser passes" for n in (2, 3, 4)]
