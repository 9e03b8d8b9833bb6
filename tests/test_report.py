"""`diffsr benchmark`: methods through the public API, tables, the papers' rows, and the HTML report in a browser."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metric_helpers import metric_weights  # noqa: F401  (fixture)
import synthetic  # noqa: E402
import diffsr
from diffsr.cli import main
from diffsr.images import Picture, resize_picture
from diffsr.progress import Step
from diffsr.report.benchmark import run_benchmark, write_outputs

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture
def dataset(tmp_path):
    lr, gt = tmp_path / "lr", tmp_path / "gt"
    lr.mkdir()
    gt.mkdir()
    for name, seed, height, width in synthetic.IMAGES:
        image = Image.fromarray(synthetic.gt_image(seed, height, width)[:128, :128])
        image.save(gt / name)
        image.resize((32, 32), Image.BICUBIC).save(lr / name)
    return lr, gt


class NoisyUpscaler:
    """Stands in for a diffusion method: bicubic plus seed-dependent noise (so runs differ)."""

    def __init__(self, strength):
        self.strength = strength

    @staticmethod
    def knob_names():
        return ()

    def check_arguments(self, scale, seed, color_fix, knobs):
        assert not knobs

    def upscale(self, picture, scale=4, seed=0, callback=None):
        for done in (1, 2, 3):  # the work it reports, as a multi-step method does (diffsr.progress)
            if callback is not None:
                callback(Step("denoise", done, 3))
        width, height = picture.size
        up = resize_picture(picture, (round(width * scale), round(height * scale)))
        noise = np.random.RandomState(seed).randint(-self.strength, self.strength + 1, up.rgb.shape)
        return Picture(np.clip(up.rgb.astype(int) + noise, 0, 255).astype(np.uint8), None, picture.name)


def read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def y_psnr(sr, gt):
    """PSNR on BT.601 luma (the papers' scripts), written out independently of diffsr.metrics."""
    def luma(rgb):
        return (rgb @ np.array([65.481, 128.553, 24.966]) + 16) / 255
    return 10 * np.log10(1 / ((luma(sr) - luma(gt)) ** 2).mean())


@pytest.fixture
def fake_methods(monkeypatch):
    calls = []

    def load_upscaler(method, base=None, weights=None, device="cpu", dtype="auto", **options):
        calls.append((method, base, weights, device, dtype))
        return NoisyUpscaler({"osediff": 3, "s3diff": 12}[method])

    monkeypatch.setattr(diffsr, "load_upscaler", load_upscaler)
    return calls


def test_benchmark_runs_methods_through_the_api(dataset, tmp_path, fake_methods, metric_weights):
    lr, gt = dataset
    bench = run_benchmark(["osediff", "s3diff", "bicubic"], lr, gt, tmp_path / "out", "psnr,ssim,lpips,niqe",
                          runs=2, bases=["BASE", "s3diff=TURBO"], weights=["osediff=o.pkl", "s3diff=s.pkl"],
                          metric_weights=metric_weights, download=False, dataset="div2k", log=lambda m: None)
    assert fake_methods == [("osediff", "BASE", "o.pkl", "cpu", "auto"), ("s3diff", "TURBO", "s.pkl", "cpu", "auto")]
    assert [m.name for m in bench.methods] == ["osediff", "s3diff", "bicubic"]
    assert sorted(p.name for p in (tmp_path / "out" / "s3diff" / "seed1").iterdir()) == ["a.png", "b.png", "c.png"]
    # The benchmark's numbers, recomputed here from the images it wrote (the fakes only make the images).
    for method in bench.methods:
        assert len(method.folders) == 2
        outputs = [[read_rgb(folder / name) for name in ("a.png", "b.png", "c.png")] for folder in method.folders]
        truth = [read_rgb(gt / name) for name in ("a.png", "b.png", "c.png")]
        psnrs = np.array([[y_psnr(out, ref) for out, ref in zip(run, truth)] for run in outputs])  # [run][image]
        assert method.summary()["psnr"] == pytest.approx(psnrs.mean(), abs=1e-3)
        assert method.evaluation.g_std["psnr"] == pytest.approx(psnrs.std(axis=0).mean(), abs=1e-3)
        per_pixel_std = [np.std([run[i] for run in outputs], axis=0)[4:-4, 4:-4].mean() for i in range(3)]
        assert method.evaluation.l_std == pytest.approx(np.mean(per_pixel_std), abs=1e-6)
    assert bench.methods[2].evaluation.l_std == 0  # bicubic is deterministic

    paths = write_outputs(bench, "test benchmark")
    markdown = paths["md"].read_text()
    assert "| method | PSNR ↑ | SSIM ↑ | LPIPS ↓ | NIQE ↓ | L-STD (pixels in [0, 1]) | s/image | peak MB |" in markdown
    assert "## Beside the papers (DIV2K-Val)" in markdown and "| osediff (1 step, paper) | 23.7200" in markdown
    assert "s3diff (1 step, paper)" in markdown
    deviations = markdown.split("G-STD over the 2 runs")[1]
    assert "| bicubic | 0.0000 | 0.0000 | 0.0000 | 0.0000 |" in deviations  # deterministic: no spread
    assert "| s3diff | 0.0000 |" not in deviations
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "method,psnr,ssim,lpips,niqe,l-std,s/image,peak MB" and len(rows) == 4
    data = json.loads(paths["json"].read_text())
    assert data["methods"][0]["evaluation"]["g_std"]["psnr"] == pytest.approx(bench.methods[0].evaluation.g_std["psnr"])
    page = paths["html"].read_text()
    # 3 images x (LR, 3 methods, GT), each as a panel and in two automatic 1:1 crops (42 px of a 128 px image)
    assert page.count("<circle") == 3 and page.count('src="data:image/png;base64,') == 3 * 5 * 3
    assert page.count('class="crop-row"') == 3 * 2 and page.count('width="42" height="42"') == 3 * 5 * 2
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_benchmark_names_a_method_that_cannot_load(dataset, tmp_path, capsys):
    lr, gt = dataset
    code = main(["benchmark", "--methods", "bicubic,osediff", "--lr", str(lr), "--gt", str(gt), "-o", str(tmp_path / "o"),
                 "--metrics", "psnr,ssim", "--weights", f"osediff={tmp_path / 'missing.pkl'}", "--base", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "osediff: cannot run:" in captured.err
    assert "| bicubic | " in captured.out
    assert (tmp_path / "o" / "report.html").exists()


def render_in_chromium(page, tmp_path):
    """Load the page in headless Chromium; return the DOM after scripts ran, and a screenshot."""
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "shot.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    return dom, shot


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium); the report is "
                                              "checked in a real browser only where one is installed")
def test_report_renders_in_a_browser(dataset, tmp_path, fake_methods):
    lr, gt = dataset
    bench = run_benchmark(["osediff", "bicubic"], lr, gt, tmp_path / "out", "psnr,ssim,niqe", log=lambda m: None)
    page = write_outputs(bench)["html"]
    dom, shot = render_in_chromium(page, tmp_path)
    check = re.search(r'id="self-check">([^<]*)<', dom)
    assert check, "the report's script did not run"
    # 3 images x (LR, 2 methods, GT) as panels and 1:1 crops; 2 methods plotted; each image's panels on one row
    assert check.group(1) == "images 36/36; plot points 2; panel rows 1; crops 24"
    assert "<svg" in dom and "perception-distortion plot" in dom
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 10  # something was drawn, not a blank page


def test_cli_evaluate_runs_upscales_with_each_seed(dataset, tmp_path, fake_methods, capsys):
    lr, gt = dataset
    code = main(["evaluate", "--lr", str(lr), "--gt", str(gt), "--runs", "3", "--method", "s3diff", "--weights", "s.pkl",
                 "--metrics", "psnr,ssim", "--work-dir", str(tmp_path / "runs"), "--format", "json"])
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert code == 0 and data["runs"] == 3
    assert sorted(p.name for p in (tmp_path / "runs" / "s3diff").iterdir()) == ["seed0", "seed1", "seed2"]
    assert data["g_std"]["psnr"] > 0 and data["l_std"] > 0
    # the same progress as `diffsr upscale` while it upscales (stderr is not a terminal here: plain lines)
    assert captured.err.count("diffsr: a.png: denoise 1/3 (33%), about ") == 3
    assert captured.err.count(": upscaled in ") == 3 * len(list(lr.iterdir()))
    assert "\r" not in captured.err and "\x1b" not in captured.err


def test_benchmark_shows_the_progress_of_each_image(dataset, tmp_path, fake_methods, monkeypatch, capsys):
    monkeypatch.setattr("diffsr.display.Display.every", 0.0)
    lr, gt = dataset
    assert main(["benchmark", "--methods", "osediff,bicubic", "--lr", str(lr), "-o", str(tmp_path / "o"),
                 "--metrics", "psnr", "--gt", str(gt)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("diffsr: a.png")]
    assert [line.split(", about")[0] for line in lines] == [f"diffsr: a.png: denoise {n}/3 ({100 * n // 3}%)"
                                                            for n in (1, 2, 3)]
    assert err.count(": upscaled in ") == 2 * len(list(lr.iterdir()))  # osediff's, and the bicubic baseline's


@pytest.mark.slow
def test_benchmark_with_tiny_osediff(tmp_path, dataset, metric_weights):
    """The real method on the tiny random model, end to end (about a minute on a CPU)."""
    from diffsr.testing import make_tiny_base, make_tiny_weights

    lr, gt = dataset
    base = make_tiny_base(tmp_path / "base")
    weights = make_tiny_weights("osediff", base, tmp_path / "osediff.pkl")
    (lr / "b.png").unlink()
    (lr / "c.png").unlink()
    code = main(["benchmark", "--methods", "osediff,bicubic", "--lr", str(lr), "--gt", str(gt), "-o", str(tmp_path / "o"),
                 "--base", str(base), "--weights", f"osediff={weights}", "--metrics", "psnr,ssim,lpips,niqe",
                 "--metric-weights", str(metric_weights), "--offline"])
    assert code == 0
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [m["name"] for m in data["methods"]] == ["osediff", "bicubic"]
    assert data["methods"][0]["seconds_per_image"] > 0
    assert set(data["methods"][0]["evaluation"]["summary"]) == {"psnr", "ssim", "lpips", "niqe"}


def test_benchmark_passes_each_method_the_knobs_it_takes(dataset, tmp_path, monkeypatch, capsys):
    """The upscale knobs on the benchmark command line reach each method that takes them, and only those."""
    from diffsr.methods import METHODS

    received = {}

    class Recording(NoisyUpscaler):
        def __init__(self, method):
            super().__init__(1)
            self.method = method
            self.knob_names = METHODS[method].knob_names  # the real method's knobs

        def check_arguments(self, scale, seed, color_fix, knobs):
            received[self.method] = dict(knobs)

        def upscale(self, picture, scale=4, seed=0, callback=None, **knobs):
            assert knobs == received[self.method]
            return super().upscale(picture, scale, seed, callback)

    monkeypatch.setattr(diffsr, "load_upscaler", lambda method, **options: Recording(method))
    lr, gt = dataset
    base = ["benchmark", "--methods", "stablesr,osediff,bicubic", "--lr", str(lr), "--gt", str(gt), "--metrics", "psnr"]
    code = main(base + ["-o", str(tmp_path / "o"), "--steps", "7", "--fidelity", "0.3", "--tile-size", "32", "--quiet"])
    assert code == 0
    assert received == {"stablesr": {"steps": 7, "fidelity": 0.3, "tile_size": 32}, "osediff": {"tile_size": 32}}
    capsys.readouterr()
    assert main(base[:2] + ["osediff,bicubic"] + base[3:] + ["-o", str(tmp_path / "p"), "--t-max", "0.5"]) == 2
    assert capsys.readouterr().err == "diffsr: error: no method of osediff, bicubic takes --t-max\n"


# -- the report's layout, crops, --show, per-method memory and plot ---------------------------------------


def dump_dom_at(page, tmp_path, width):
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
              f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={width},1000"]
    return subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_ground_truth_stays_beside_four_methods_at_any_width(dataset, tmp_path, fake_methods):
    lr, gt = dataset
    extra = tmp_path / "extra"
    extra.mkdir()
    for path in lr.iterdir():  # finished results from another tool: a fourth method
        Image.open(path).resize((128, 128), Image.NEAREST).save(extra / path.name)
    bench = run_benchmark(["osediff", "s3diff", "bicubic"], lr, gt, tmp_path / "out", "psnr,ssim",
                          results=[f"nearest={extra}"], log=lambda m: None)
    page = write_outputs(bench, show=["a"])["html"]
    for width in (1400, 700):
        check = re.search(r'id="self-check">([^<]*)<', dump_dom_at(page, tmp_path, width)).group(1)
        # LR, four methods, GT: six panels and two crops of each, all panels of the image on one row
        assert check == "images 18/18; plot points 0; panel rows 1; crops 12", (width, check)


def test_crops_given_or_picked_with_boxes_on_the_images(tmp_path):
    from diffsr.images import Picture
    from diffsr.report.html import CROP_COLORS, Crop, _boxed, _crop_of, detailed_regions, parse_crop

    rng = np.random.RandomState(0)
    flat = np.full((120, 160, 3), 128, np.uint8)
    flat[70:102, 20:52] = rng.randint(0, 256, (32, 32, 3))  # the one detailed region
    picked = detailed_regions(Picture(flat), count=2, size=32)
    assert picked[0] == Crop(20, 70, 32)
    assert len(picked) == 2 and abs(picked[1].x - 20) >= 32 or abs(picked[1].y - 70) >= 32  # no overlap

    boxed = np.asarray(_boxed(Picture(flat), [Crop(20, 70, 32)], (160, 120)))
    red = tuple(int(CROP_COLORS[0][i:i + 2], 16) for i in (1, 3, 5))
    assert tuple(boxed[70, 30]) == red and tuple(boxed[101, 30]) == red and tuple(boxed[60, 30]) == (128,) * 3
    lr = Picture(flat[::4, ::4].copy())  # a quarter-size input: its crop is enlarged to the reference's scale
    crop = np.asarray(_crop_of(lr, Crop(20, 68, 32), (160, 120)))
    assert crop.shape == (32, 32, 3) and (crop == np.repeat(np.repeat(flat[::4, ::4][17:25, 5:13], 4, 0), 4, 1)).all()
    assert np.array_equal(np.asarray(_crop_of(Picture(flat), Crop(20, 70, 32), (160, 120))), flat[70:102, 20:52])
    assert parse_crop("20,70,32") == Crop(20, 70, 32)
    with pytest.raises(diffsr.UsageError, match="X,Y,SIZE"):
        parse_crop("20,70")


def test_cli_benchmark_show_and_crop(dataset, tmp_path, fake_methods, capsys):
    lr, gt = dataset
    out = tmp_path / "o"
    code = main(["benchmark", "--methods", "osediff,bicubic", "--lr", str(lr), "--gt", str(gt), "-o", str(out),
                 "--metrics", "psnr", "--show", "c.png,b", "--crop", "8,16,40", "--crop", "60,60,24", "--quiet"])
    assert code == 0
    page = (out / "report.html").read_text()
    assert re.findall(r"<h3>([^<]*)</h3>", page) == ["c.png", "b.png"]  # the images asked for, in that order
    assert page.count('class="crop-row"') == 2 * 2 and page.count('width="40" height="40"') == 2 * 4
    assert "1:1 crops (given;" in page
    capsys.readouterr()
    assert main(["benchmark", "--methods", "bicubic", "--lr", str(lr), "-o", str(out), "--show", "zzz"]) == 2
    assert "--show: no LR image named zzz" in capsys.readouterr().err


def test_show_chooses_the_images(tmp_path):
    from diffsr.report.html import chosen_images, parse_show

    paths = [tmp_path / f"{i:02d}.png" for i in range(12)]
    assert chosen_images(paths, parse_show(None)) == paths[:8]
    assert chosen_images(paths, parse_show("all")) == paths
    assert chosen_images(paths, parse_show("3")) == paths[:3]
    assert chosen_images(paths, parse_show("11.png, 02")) == [paths[11], paths[2]]


class HungryUpscaler(NoisyUpscaler):
    """Touches `megabytes` of memory while upscaling (then frees it)."""

    def __init__(self, strength, megabytes):
        super().__init__(strength)
        self.megabytes = megabytes

    def upscale(self, picture, scale=4, seed=0, callback=None):
        block = np.ones(self.megabytes * 2**20 // 8)
        block.sum()
        del block
        return super().upscale(picture, scale, seed, callback)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-method RSS peaks need Linux's clear_refs")
def test_peak_memory_is_measured_per_method(dataset, tmp_path, monkeypatch):
    from diffsr.report.benchmark import RSS_PEAK

    hungry = {"osediff": 400, "s3diff": 0}
    monkeypatch.setattr(diffsr, "load_upscaler", lambda method, **kw: HungryUpscaler(3, hungry[method]))
    lr, gt = dataset
    bench = run_benchmark(["osediff", "s3diff"], lr, gt, tmp_path / "out", "psnr", log=lambda m: None)
    first, second = bench.methods
    assert first.memory_kind == second.memory_kind == RSS_PEAK
    # the second method's figure is its own, not the first's peak carried over
    assert first.peak_memory_mb > second.peak_memory_mb + 300


def test_plot_names_its_metrics_and_has_round_ticks():
    from types import SimpleNamespace

    from diffsr.report.html import nice_ticks, scatter_plot

    assert nice_ticks(21.37, 24.91) == [21.0, 22.0, 23.0, 24.0, 25.0]
    assert nice_ticks(0.1234, 0.3456) == [0.1, 0.2, 0.3, 0.4]
    assert nice_ticks(0.231, 0.289) == [0.22, 0.24, 0.26, 0.28, 0.3]
    methods = [SimpleNamespace(name=n, summary=lambda s=s: s) for n, s in
               (("a", {"psnr": 23.712, "lpips": 0.2813}), ("b", {"psnr": 22.104, "lpips": 0.2377}))]
    svg = scatter_plot(SimpleNamespace(methods=methods))
    ticks = re.findall(r'class="tick"[^>]*>([^<]*)<', svg)
    assert ticks and all(len(t) <= 5 for t in ticks)  # no 0.23770000001-style labels
    assert "PSNR" in svg and "LPIPS" in svg
    caption = re.search(r'id="pd-caption">(.*?)</p>', svg).group(1)
    assert "<b>PSNR ↑</b> (x, a distortion metric)" in caption and "<b>LPIPS ↓</b> (y, a perception metric)" in caption
