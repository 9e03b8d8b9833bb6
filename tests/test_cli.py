import re
import time
from pathlib import Path

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
    # a knob's value against its method's Knobs field, before the weights are read
    (["--method", "stablesr", "--fidelity", "1.5"], "--fidelity must be at most 1 and at least 0, got 1.5"),
    (["--method", "stablesr", "--steps", "0"], "--steps must be at least 1 and at most 1000, got 0"),
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


def upscale_recording_the_load(tmp_path, tiny_base, osediff_weights, monkeypatch, flags) -> dict:
    """Run `diffsr upscale` with `flags` on a tiny OSEDiff; the load_upscaler options it gave and the upscaler."""
    import diffsr

    load, loaded = diffsr.load_upscaler, {}

    def recording_load(*args, **options):
        loaded["options"] = options
        loaded["upscaler"] = load(*args, **options, process_size=64)
        return loaded["upscaler"]

    monkeypatch.setattr(diffsr, "load_upscaler", recording_load)
    Image.fromarray(smooth_image(12, 12)).save(tmp_path / "a.png")
    args = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--tagger", "none"]
    assert main(args + model_args(tiny_base, osediff_weights) + flags) == 0
    return loaded


@pytest.mark.parametrize("flags, given", [([], None), (["--winograd"], True), (["--no-winograd"], False)])
def test_winograd_flag_reaches_the_loader_and_is_the_default(tmp_path, tiny_base, osediff_weights, monkeypatch,
                                                             flags, given):
    from diffsr.nets.winograd import WinogradConv2d, available

    loaded = upscale_recording_the_load(tmp_path, tiny_base, osediff_weights, monkeypatch, flags)
    assert loaded["options"].get("winograd") == given
    switched = [m for n in loaded["upscaler"].networks() for m in n.modules() if isinstance(m, WinogradConv2d)]
    assert bool(switched) is (given is not False and available())


@pytest.mark.parametrize("flags, given", [([], None), (["--merge-lora"], True), (["--no-merge-lora"], False)])
def test_merge_lora_flag_reaches_the_loader_and_merging_is_the_default(tmp_path, tiny_base, osediff_weights,
                                                                       monkeypatch, flags, given):
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded = upscale_recording_the_load(tmp_path, tiny_base, osediff_weights, monkeypatch, flags)
    assert loaded["options"].get("merge_lora") == given
    unet = loaded["upscaler"].backbone.unet
    layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
    assert layers and all(layer.merged is (given is not False) for layer in layers)


def test_float16_on_cpu_warns_and_suggests_float32(tmp_path, capsys):
    args = ["upscale", str(tmp_path), "-o", str(tmp_path / "out"), "--dtype", "float16"]
    assert main(args) == 2  # an empty folder: the warning comes before that
    err = capsys.readouterr().err
    assert "warning: --dtype float16 on the CPU is very slow" in err and "float32, the default" in err
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
def test_one_step_methods_on_small_images_show_no_phase_progress(tmp_path, tiny_base, osediff_weights,
                                                                 small_process_size, terminal, monkeypatch, capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    args = ["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--scale", "2", "--base", str(tiny_base),
            "--weights", str(osediff_weights)]
    monkeypatch.setattr("diffsr.display.Display.every", 0.0)
    err = progress_run(args, monkeypatch, capsys, terminal)
    assert not any(phase in err for phase in ("encode", "denoise", "decode", "pass")) and "wrote 1 image(s)" in err
    if terminal:
        assert "\r" in err and "osediff x2" in err  # the image bar
    else:  # not a terminal: plain lines only
        assert "\r" not in err and "\x1b" not in err
        assert "diffsr: [1/1] x.png: upscaled in " in err


CCSR_4_PASSES = ["--method", "ccsr", "--steps", "10", "--t-max", "0.5", "--t-min", "0.2"]


@pytest.mark.parametrize("terminal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_multi_step_progress_shows_the_phase_with_its_total_and_time_left(tmp_path, tiny_base, ccsr_v2_weights,
                                                                          small_process_size, terminal, monkeypatch,
                                                                          capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    args = ["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--scale", "2", "--base", str(tiny_base),
            "--weights", str(ccsr_v2_weights)] + CCSR_4_PASSES
    monkeypatch.setattr("diffsr.display.Display.every", 0.0)
    err = progress_run(args, monkeypatch, capsys, terminal)
    if terminal:  # a bar for the phase: its total and tqdm's elapsed<remaining
        assert re.search(r"x\.png: denoise: +\d+%.*\| 4/4 \[\d\d:\d\d<\d\d:\d\d", err), err
    else:
        assert "\r" not in err and "\x1b" not in err
        lines = [line for line in err.splitlines() if "denoise" in line]
        assert [re.sub(r"about \d+ s left", "about N s left", line) for line in lines] == [
            f"diffsr: x.png: denoise {n}/4 ({25 * n}%), about N s left" for n in (1, 2, 3, 4)]


@pytest.mark.slow  # a second CCSR run; the spacing itself is checked with a clock below, in the default run
def test_plain_progress_lines_are_spaced_out_but_every_phase_is_said(tmp_path, tiny_base, ccsr_v2_weights,
                                                                     small_process_size, monkeypatch, capsys):
    """Not a terminal, with lines spaced further apart than the run takes: one line as the phase begins only."""
    monkeypatch.setattr("diffsr.display.Display.every", 1e6)
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--scale", "2", "--base",
                 str(tiny_base), "--weights", str(ccsr_v2_weights)] + CCSR_4_PASSES) == 0
    err = capsys.readouterr().err
    assert [line.split(" (")[0] for line in err.splitlines() if "/4" in line] == ["diffsr: x.png: denoise 1/4"]
    assert err.count("diffsr: [1/1] x.png: upscaled in ") == 1


@pytest.mark.slow
def test_messages_on_a_terminal_are_never_glued_to_a_bar(inputs, tmp_path, tiny_base, osediff_weights,
                                                         small_process_size, monkeypatch):
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    code = main(["upscale", str(inputs), "-o", str(tmp_path / "out"), "--scale", "2", "--base", str(tiny_base),
                 "--weights", str(osediff_weights)])
    monkeypatch.undo()
    err = stream.text.getvalue()
    assert code == 1 and "osediff x2" in err
    assert re.search(r"(^|[\r\n])diffsr: error: \S*broken\.png: not an image", err), err


def test_the_display_says_each_phase_once_with_its_time_left(monkeypatch):
    """The plain display on its own, with a clock: a line as each phase begins, then one every `every` s; the
    time left is the phase's pace so far times the units left; phases of one unit say nothing."""
    import io

    from diffsr.display import Display
    from diffsr.progress import Step

    now = [100.0]
    monkeypatch.setattr("diffsr.display.time.monotonic", lambda: now[0])
    stream = io.StringIO()
    display = Display(stream=stream)
    display.batch("ccsr x4", 1)
    display.start(Path("a.png"))
    for seconds, step in [(1, Step("encode", 1, 1)), (2, Step("denoise", 1, 40)), (2, Step("denoise", 2, 40)),
                          (7, Step("denoise", 6, 40)), (9, Step("denoise", 7, 40)), (1, Step("decode", 1, 2)),
                          (1, Step("decode", 2, 2))]:
        now[0] += seconds
        display.step(step)
    display.finish(Path("a.png"), 23.0, upscaled=True)
    display.end()
    assert stream.getvalue().splitlines() == [
        "diffsr: a.png: denoise 1/40 (2%), about 78 s left",  # 2 s for the first of 40
        "diffsr: a.png: denoise 7/40 (17%), about 94 s left",  # 18 s after the last line; 20 s for 7
        "diffsr: a.png: decode 1/2 (50%), about 1 s left",
        "diffsr: [1/1] a.png: upscaled in 23.0 s"]


# -- method flags from the methods' Knobs dataclasses (diffsr.knobs) ------------------------------------------

@pytest.fixture()
def declared_knobs(monkeypatch):
    """Knobs declared for stablesr and ccsr as the methods declare theirs (whatever they declare by now)."""
    from dataclasses import dataclass

    from diffsr.errors import UsageError
    from diffsr.knobs import Knobs, knob
    from diffsr.methods import METHODS

    @dataclass(frozen=True)
    class StableKnobs(Knobs):
        prompt: str = knob("", "text prompt")
        steps: int = knob(200, "sampling steps", low=1)
        sampler: str = knob("ddpm", "the sampler", choices=("ddpm", "ddim"))
        fidelity: float = knob(0.5, "CFW weight w: 0 = realism, 1 = fidelity (100% the input's)", low=0, high=1)
        eta: float = knob(0.0, "DDIM noise", low=0)
        early: bool = knob(False, "a switch")

    @dataclass(frozen=True)
    class CcsrKnobs(Knobs):
        prompt: str = knob("", "text prompt")
        steps: int = knob(45, "sampling steps", low=1)
        t_max: float = knob(0.6667, "where the chain starts", low=0, high=1, low_open=True)
        t_min: float = knob(0.3333, "where the chain stops", low=0, high=1)

        def check(self):
            if self.t_min >= self.t_max:
                raise UsageError(f"t_min ({self.t_min}) must be smaller than t_max ({self.t_max})")

    monkeypatch.setattr(METHODS["stablesr"], "Knobs", StableKnobs)
    monkeypatch.setattr(METHODS["ccsr"], "Knobs", CcsrKnobs)


def help_groups(command="upscale") -> dict[str, dict[str, str]]:
    """{group title: {flag: help}} of a command's parser."""
    from diffsr.cli import _subparser, build_parser

    parser = _subparser(build_parser(), command)
    return {group.title: {(action.option_strings or [action.dest])[0]: action.help for action in group._group_actions}
            for group in parser._action_groups}


def test_method_flags_come_from_the_knobs_grouped_per_method_with_defaults(declared_knobs, capsys):
    groups = help_groups()
    stablesr, shared = groups["stablesr options"], groups["shared by several methods"]
    assert stablesr["--fidelity"] == "CFW weight w: 0 = realism, 1 = fidelity (100%% the input's); at least 0 and " \
                                     "at most 1 (default 0.5)"
    assert stablesr["--sampler"] == "the sampler (default 'ddpm')" and stablesr["--early"] == "a switch (default False)"
    assert groups["ccsr options"]["--t-max"] == "where the chain starts; above 0 and at most 1 (default 0.6667)"
    # a flag several methods take: once, in the shared group, with each method's default
    assert "--steps" not in stablesr and "--steps" not in groups["ccsr options"]
    assert shared["--steps"].startswith("sampling steps; at least 1 (default ")
    assert "stablesr 200" in shared["--steps"] and "ccsr 45" in shared["--steps"]
    assert "stablesr: text prompt (default '')" in shared["--prompt"]  # meanings differ: each method's help
    # the tiling group and the load options stay as they were
    assert "--max-memory" in groups["tiling (large images; sizes in latent pixels = 8 image pixels)"]
    with pytest.raises(SystemExit) as exit_info:
        main(["upscale", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "stablesr options:" in out and "shared by several methods:" in out
    assert out.index("shared by several methods:") < out.index("stablesr options:")


def test_the_methods_flags_are_grouped_in_help():
    """The methods' own Knobs, as declared."""
    groups = help_groups()
    assert {"--fidelity", "--sampler", "--eta"} <= set(groups["stablesr options"])
    assert {"--show-degradation", "--degradation-blur", "--degradation-noise"} <= set(groups["s3diff options"])
    assert {"--prompt", "--negative-prompt", "--steps", "--guidance-scale"} <= set(groups["shared by several methods"])
    # a knob that is also a load option keeps the load option's one flag
    assert [title for title, flags in groups.items() if "--sample-posterior" in flags] == ["options"]


def test_benchmark_takes_the_same_method_flags(declared_knobs):
    upscale, benchmark = help_groups("upscale"), help_groups("benchmark")
    for title in ("shared by several methods", "stablesr options", "ccsr options", "s3diff options"):
        assert benchmark[title] == upscale[title]


def test_flags_from_the_knobs_reach_the_method(declared_knobs):
    from diffsr.cli import _method_knobs, _subparser, build_parser

    args = _subparser(build_parser(), "upscale").parse_args(["x.png", "-o", "out", "--method", "stablesr", "--steps",
                                                            "20", "--sampler", "ddim", "--early"])
    assert _method_knobs(args) == {"steps": 20, "sampler": "ddim", "early": True}


@pytest.mark.parametrize("flags, message", [
    (["--method", "stablesr", "--fidelity", "1.5"], "--fidelity must be at most 1 and at least 0, got 1.5"),
    (["--method", "stablesr", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["--method", "ccsr", "--t-max", "0"], "--t-max must be above 0 and at most 1, got 0.0"),
    (["--method", "stablesr", "--early", "--t-max", "0.5"], "--method stablesr does not take --t-max (a flag of ccsr)"),
])
def test_knob_values_are_checked_before_loading(declared_knobs, one_image, flags, message, capsys, tmp_path):
    assert message in usage_error(one_image + flags, capsys)
    assert not (tmp_path / "out").exists()


def test_benchmark_checks_knob_values_before_loading(declared_knobs, tmp_path, capsys):
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "x.png")
    code = main(["benchmark", "--methods", "bicubic,stablesr", "--lr", str(tmp_path), "-o", str(tmp_path / "report"),
                 "--base", str(tmp_path), "--weights", f"stablesr={tmp_path / 'missing.ckpt'}", "--fidelity", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err == "diffsr: error: --fidelity must be at least 0 and at most 1, got -1.0\n"
    assert not (tmp_path / "report").exists()


def test_terminal_bars_are_redrawn_while_a_unit_runs(monkeypatch):
    """tqdm redraws only when a unit ends; the display redraws on a timer so the elapsed time moves on."""
    from diffsr.display import Display
    from diffsr.progress import Step

    monkeypatch.setattr(Display, "refresh_every", 0.05)
    stream = Terminal()
    display = Display(stream=stream)
    display.batch("stablesr x4", 1)
    display.start(Path("a.png"))
    display.step(Step("denoise", 1, 40))
    drawn = stream.text.getvalue().count("a.png: denoise")
    time.sleep(0.5)  # no unit ends meanwhile
    assert stream.text.getvalue().count("a.png: denoise") >= drawn + 3
    display.finish(Path("a.png"), 1.0, upscaled=True)
    display.end()
    closed = stream.text.getvalue()
    time.sleep(0.2)
    assert stream.text.getvalue() == closed  # the timer stops with the batch
