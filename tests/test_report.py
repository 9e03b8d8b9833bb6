"""`diffsr benchmark`: methods through the public API, tables, the papers' rows, and the HTML report in a browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from metric_helpers import metric_weights  # noqa: F401  (fixture)
import synthetic  # noqa: E402
import diffsr
from diffsr.cli import main
from diffsr.images import Picture, resize_picture
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

    def upscale(self, picture, scale=4, seed=0):
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

    def load_upscaler(method, base=None, weights=None, device="cpu", dtype="float32", **options):
        calls.append((method, base, weights, device, dtype))
        return NoisyUpscaler({"osediff": 3, "s3diff": 12}[method])

    monkeypatch.setattr(diffsr, "load_upscaler", load_upscaler)
    return calls


def test_benchmark_runs_methods_through_the_api(dataset, tmp_path, fake_methods, metric_weights):
    lr, gt = dataset
    bench = run_benchmark(["osediff", "s3diff", "bicubic"], lr, gt, tmp_path / "out", "psnr,ssim,lpips,niqe",
                          runs=2, bases=["BASE", "s3diff=TURBO"], weights=["osediff=o.pkl", "s3diff=s.pkl"],
                          metric_weights=metric_weights, download=False, dataset="div2k", log=lambda m: None)
    assert fake_methods == [("osediff", "BASE", "o.pkl", "cpu", "float32"), ("s3diff", "TURBO", "s.pkl", "cpu", "float32")]
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
    assert page.count("<circle") == 3 and page.count('src="data:image/png;base64,') == 3 * 5
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
    assert check.group(1) == "images 12/12; plot points 2"  # 3 images x (LR, 2 methods, GT); 2 methods plotted
    assert "<svg" in dom and "perception-distortion plot" in dom
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 10  # something was drawn, not a blank page


def test_cli_evaluate_runs_upscales_with_each_seed(dataset, tmp_path, fake_methods, capsys):
    lr, gt = dataset
    code = main(["evaluate", "--lr", str(lr), "--gt", str(gt), "--runs", "3", "--method", "s3diff", "--weights", "s.pkl",
                 "--metrics", "psnr,ssim", "--work-dir", str(tmp_path / "runs"), "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["runs"] == 3
    assert sorted(p.name for p in (tmp_path / "runs" / "s3diff").iterdir()) == ["seed0", "seed1", "seed2"]
    assert data["g_std"]["psnr"] > 0 and data["l_std"] > 0


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

        def upscale(self, picture, scale=4, seed=0, **knobs):
            assert knobs == received[self.method]
            return super().upscale(picture, scale, seed)

    monkeypatch.setattr(diffsr, "load_upscaler", lambda method, **options: Recording(method))
    lr, gt = dataset
    base = ["benchmark", "--methods", "stablesr,osediff,bicubic", "--lr", str(lr), "--gt", str(gt), "--metrics", "psnr"]
    code = main(base + ["-o", str(tmp_path / "o"), "--steps", "7", "--fidelity", "0.3", "--tile-size", "32", "--quiet"])
    assert code == 0
    assert received == {"stablesr": {"steps": 7, "fidelity": 0.3, "tile_size": 32}, "osediff": {"tile_size": 32}}
    capsys.readouterr()
    assert main(base[:2] + ["osediff,bicubic"] + base[3:] + ["-o", str(tmp_path / "p"), "--t-max", "0.5"]) == 2
    assert capsys.readouterr().err == "diffsr: error: no method of osediff, bicubic takes --t-max\n"
