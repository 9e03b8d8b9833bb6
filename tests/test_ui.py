"""The web app's logic without a browser (diffsr.ui.service) and the `diffsr ui` command line."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from ui_helpers import StandIn
from diffsr.cli import build_parser, _method_knobs, main
from diffsr.ui import service
from diffsr.ui.service import ModelCache, Settings


def test_method_knobs_from_the_controls():
    values = {"steps": 3.0, "t_max": 0.5, "t_min": None, "guidance_scale": 2.0}
    assert service.method_knobs("ccsr", values) == {"steps": 3, "t_max": 0.5, "guidance_scale": 2.0}
    scores = {"guidance_scale": 1.07, "degradation_blur": 0.25, "degradation_noise": 0.5}
    assert service.method_knobs("s3diff", scores) == {"guidance_scale": 1.07}  # each image's estimate
    assert service.method_knobs("s3diff", scores, edit_degradation=True) == {"guidance_scale": 1.07,
                                                                            "degradation": (0.25, 0.5)}
    assert service.tiling_knobs({"max_memory": 2.5, "tile_size": 64.0, "tile_overlap": None}) == \
        {"max_memory": 2.5, "tile_size": 64}


def test_release_defaults_follow_the_variant():
    from diffsr.methods.ccsr import V1_DEFAULTS, V2_DEFAULTS

    assert service.release_defaults("ccsr", "ccsr-v1")["steps"] == V1_DEFAULTS["steps"] == 45
    assert service.release_defaults("ccsr", "/models/real-world_ccsr.ckpt")["t_min"] == V1_DEFAULTS["t_min"]
    assert service.release_defaults("ccsr", "ccsr-v2")["t_max"] == V2_DEFAULTS["t_max"]
    assert service.release_defaults("stablesr", "stablesr-turbo") == {"steps": 4}
    assert service.release_defaults("stablesr", "stablesr") == {"steps": 200}
    controls = {c.knob: c for c in service.CONTROLS["stablesr"]}
    assert controls["fidelity"].default == 0.5 and (controls["fidelity"].minimum, controls["fidelity"].maximum) == (0, 1)


def test_settings_command_runs_the_same_upscale():
    """The command saved beside a result parses back to the same knobs in `diffsr upscale`."""
    knobs = {"steps": 4, "fidelity": 0.7, "prompt": "a photo, sharp", "degradation": (0.125, 0.5)}
    settings = Settings("stablesr", "/w/stablesr.ckpt", 2.5, 7, "wavelet", knobs, base="/b")
    args = build_parser().parse_args(__import__("shlex").split(settings.command("in.png"))[1:])
    assert (args.method, args.weights, args.base, args.scale, args.seed, args.color_fix) == \
        ("stablesr", "/w/stablesr.ckpt", "/b", 2.5, 7, "wavelet")
    assert _method_knobs(args) == knobs


def test_model_cache_keeps_models_by_key():
    model = StandIn()
    cache = ModelCache("cpu", "float32", bases={"ccsr": "/ccsr-base"}, default_base="/base", keep=2, load=model.load)
    first = cache.get("osediff", "/w/a.pkl")
    assert cache.get("osediff", "/w/a.pkl") is first and len(model.calls) == 1  # loaded once
    cache.get("s3diff", "s3diff")
    cache.get("ccsr", "/w/ccsr")
    assert cache.loaded() == [("s3diff", "s3diff", "cpu", "float32"), ("ccsr", "/w/ccsr", "cpu", "float32")]
    assert cache.base_for("osediff", "/w/a.pkl") == "/base"  # local weights: the given base
    assert cache.base_for("s3diff", "s3diff") is None  # a registry variant knows its base
    assert cache.base_for("ccsr", "ccsr-v1") == "/ccsr-base"


def test_model_choices_list_local_weights_then_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    choices = service.model_choices("stablesr", {"stablesr": "/models/mine.ckpt"})
    assert choices[0].value == "/models/mine.ckpt" and choices[0].label.startswith("local:")
    names = [c.value for c in choices[1:]]
    assert {"stablesr", "stablesr-turbo"} <= set(names) and "stablesr-cfw" not in names  # weights, not extras
    turbo = next(c for c in choices if c.value == "stablesr-turbo")
    assert not turbo.cached and turbo.label.endswith("not downloaded")


def test_upscale_files_writes_each_input_in_its_format_and_depth(tmp_path):
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "a.jpg", quality=95)
    cv2.imwrite(str(tmp_path / "b.png"), rng.randint(0, 65536, (8, 6, 3)).astype(np.uint16))
    (tmp_path / "c.png").write_text("not an image")
    model = StandIn(seconds=0)
    updates = []
    outcome = service.upscale_files(ModelCache(load=model.load), Settings("osediff", "/w.pkl", 2, 3, None, {"prompt": "x"}),
                                    [tmp_path / n for n in ("a.jpg", "b.png", "c.png")], tmp_path / "out",
                                    {"tile_size": 64}, lambda fraction, text: updates.append((fraction, text)))
    assert [r.output.name for r in outcome.results] == ["a.jpg", "b.png"]
    assert outcome.errors == [f"{tmp_path / 'c.png'}: not an image (or an unsupported format)"]
    assert Image.open(tmp_path / "out" / "a.jpg").format == "JPEG"
    deep = cv2.imread(str(tmp_path / "out" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and deep.shape == (16, 12, 3)
    saved = json.loads((tmp_path / "out" / "a.jpg.json").read_text())
    assert saved["knobs"] == {"prompt": "x", "tile_size": 64} and saved["seed"] == 3 and saved["input"] == "a.jpg"
    assert outcome.results[0].before.size == outcome.results[0].after.size == (24, 20)
    fractions = [f for f, _ in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert updates[0][1] == "loading osediff" and any("reading b.png" in text for _, text in updates)


def test_tracker_reports_denoise_steps_with_an_eta():
    from diffsr.progress import Step

    updates = []
    tracker = service.Tracker(lambda fraction, text: updates.append((fraction, text)), images=2)
    tracker.next_image()
    tracker.step(Step("encode", 1, 1))  # only the denoiser's work moves the bar
    assert updates == []
    for done in (1, 2):
        tracker.step(Step("denoise", done, 4))
    assert updates[-1][0] == pytest.approx(0.25) and "denoise 2/4" in updates[-1][1] and "s left" in updates[-1][1]
    tracker.next_image()
    tracker.step(Step("denoise", 1, 3))
    assert updates[-1][0] == pytest.approx(0.5 + 0.5 / 3) and updates[-1][1].startswith("image 2/2")


def test_compare_needs_two_to_four_methods(tmp_path):
    with pytest.raises(service.UsageError, match="two to four"):
        service.compare_methods(ModelCache(load=StandIn().load), ["osediff"], {}, tmp_path / "x.png", None, 4, 0,
                                tmp_path)


def test_compare_scores_each_method_against_the_reference(tmp_path):
    rng = np.random.RandomState(1)
    reference = rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(reference).save(tmp_path / "ref.png")
    Image.fromarray(reference[::4, ::4]).save(tmp_path / "lr.png")
    panels = service.compare_methods(ModelCache(load=StandIn(seconds=0).load), ["osediff", "s3diff"], {},
                                     tmp_path / "lr.png", tmp_path / "ref.png", 4, 0, tmp_path / "cmp", ("psnr", "ssim"))
    assert [p.label for p in panels] == ["input (nearest)", "osediff", "s3diff", "reference"]
    assert set(panels[1].scores) == {"psnr", "ssim"} and 0 < panels[1].scores["psnr"] < 100


def test_ui_without_gradio_says_what_to_install(monkeypatch, capsys):
    import diffsr.ui

    monkeypatch.setattr(diffsr.ui, "gradio_available", lambda: False)
    assert main(["ui"]) == 2
    assert capsys.readouterr().err.strip() == 'diffsr: error: the web app needs gradio: pip install "diffsr[ui]"'


def test_ui_auth_must_be_user_and_password(capsys):
    pytest.importorskip("gradio")
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert "--auth must be USER:PASSWORD" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_line_does_not_import_gradio():
    code = "import sys, diffsr, diffsr.cli; diffsr.cli.build_parser(); assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_upload_paths_keep_a_folders_images_only():
    paths = service.upload_paths(["/up/a.png"], ["/up/f/z.jpg", "/up/f/notes.txt", "/up/f/.hidden.png", "/up/f/b.tif"])
    assert [p.name for p in paths] == ["a.png", "b.tif", "z.jpg"]
