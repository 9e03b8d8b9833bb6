"""`diffsr evaluate` and the evaluation library: matching, problems named, formats, stability over runs."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from metric_helpers import FIXTURES, metric_weights, no_weight_cache  # noqa: F401  (fixtures)
import synthetic  # noqa: E402
from diffsr.cli import main
from diffsr.errors import UsageError
from diffsr.metrics.evaluate import evaluate, evaluate_runs, render
from diffsr.metrics.stability import g_std, l_std, pixel_std

REFERENCE = json.loads((FIXTURES / "metrics" / "pyiqa_reference.json").read_text())


@pytest.fixture
def folders(tmp_path):
    return synthetic.write_image_folders(tmp_path)


def test_evaluate_folders_gives_pyiqa_numbers(folders, metric_weights):
    sr_dir, gt_dir = folders
    result = evaluate(sr_dir, gt_dir, "psnr,ssim,lpips,niqe", weights_dir=metric_weights, download=False)
    assert set(result.per_image) == {"a.png", "b.png", "c.png"}
    for image, scores in result.per_image.items():
        for metric, value in scores.items():
            assert abs(value - REFERENCE["images"][image][metric]) < 1e-4, (image, metric)
    expected_mean = np.mean([REFERENCE["images"][i]["psnr"] for i in ("a.png", "b.png", "c.png")])
    assert result.summary()["psnr"] == pytest.approx(expected_mean, abs=1e-4)
    assert not result.problems and not result.unavailable


def test_unmatched_names_and_size_mismatch_are_reported(folders):
    sr_dir, gt_dir = folders
    Image.new("RGB", (100, 100)).save(sr_dir / "extra.png")
    Image.open(sr_dir / "b.png").resize((96, 96)).save(sr_dir / "b.png")
    Image.open(gt_dir / "c.png").save(gt_dir / "c.jpg")  # GT may use another extension: matched by stem
    (gt_dir / "c.png").unlink()
    Image.new("RGB", (64, 64)).save(gt_dir / "lonely.png")
    result = evaluate(sr_dir, gt_dir, "psnr,niqe")
    problems = "\n".join(result.problems)
    assert "extra.png: no ground truth named extra.*" in problems
    assert "lonely.png: ground truth without a result" in problems
    assert "b.png: size 96x96 differs from ground truth 192x192; full-reference metrics skipped" in problems
    assert "psnr" not in result.per_image["b.png"] and "niqe" in result.per_image["b.png"]
    assert "psnr" in result.per_image["c.png"]


def test_missing_weights_fail_alone(folders, no_weight_cache, tmp_path):
    sr_dir, gt_dir = folders
    result = evaluate(sr_dir, gt_dir, "psnr,lpips,ssim", weights_dir=tmp_path / "nothing", download=False)
    assert "LPIPS_v0.1_alex-df73285e.pth" in result.unavailable["lpips"]
    assert all({"psnr", "ssim"} <= set(scores) for scores in result.per_image.values())
    text = render(result, "md")
    assert "lpips: not computed: missing weights file LPIPS_v0.1_alex-df73285e.pth" in text


def test_formats(folders):
    sr_dir, gt_dir = folders
    result = evaluate(sr_dir, gt_dir, "psnr,ssim")
    markdown = render(result, "md")
    assert markdown.splitlines()[0] == "| image | PSNR ↑ | SSIM ↑ |"
    assert markdown.splitlines()[-1].startswith("| mean | 26.78")
    rows = list(csv.reader(io.StringIO(render(result, "csv"))))
    assert rows[0] == ["image", "psnr", "ssim"] and rows[-1][0] == "mean" and len(rows) == 5
    data = json.loads(render(result, "json"))
    assert data["per_image"]["a.png"]["psnr"] == pytest.approx(REFERENCE["images"]["a.png"]["psnr"], abs=1e-4)
    assert set(data["summary"]) == {"psnr", "ssim"}


def test_stability_formulas():
    # G-STD: population std over runs per image, averaged over images (CCSR eq. 4)
    assert g_std([[1.0, 2.0], [3.0, 6.0]]) == pytest.approx((1.0 + 2.0) / 2)
    # L-STD: per-pixel std over runs of values in [0, 1], averaged (CCSR eq. 5)
    base = np.full((4, 5, 3), 100, np.uint8)
    runs = [base, base + 3, base + 6]
    assert pixel_std(runs, crop_border=0) == pytest.approx(np.std([0, 3, 6]) / 255)
    # outputs[run][image]: the first image varies over the runs, the second does not
    assert l_std([[r, base] for r in runs], crop_border=0) == pytest.approx(np.std([0, 3, 6]) / 255 / 2)
    with pytest.raises(UsageError, match="at least 2 runs"):
        g_std([[1.0, 2.0]])


def test_evaluate_runs_reports_g_std_and_l_std(tmp_path):
    _, gt_dir = synthetic.write_image_folders(tmp_path)
    run_dirs = []
    for k, offset in enumerate((0, 2, 4)):
        folder = tmp_path / f"seed{k}"
        folder.mkdir()
        for path in sorted(gt_dir.iterdir()):
            pixels = np.asarray(Image.open(path)).astype(np.int16)
            Image.fromarray(np.clip(pixels + offset, 0, 255).astype(np.uint8)).save(folder / path.name)
        run_dirs.append(folder)
    result = evaluate_runs(run_dirs, gt_dir, "psnr,ssim")
    per_run = np.array([[run.per_image[name]["psnr"] for name in sorted(run.per_image)] for run in result.runs])
    assert result.g_std["psnr"] == pytest.approx(per_run.std(axis=0).mean())
    assert result.summary()["psnr"] == pytest.approx(per_run.mean())
    assert 0 < result.l_std <= np.std([0, 2, 4]) / 255 + 1e-12  # equal except where clipped at 255
    table = render(result, "md")
    assert "| metric | mean of 3 runs | G-STD |" in table and "L-STD (pixels in [0, 1])" in table


def test_cli_evaluate(folders, tmp_path, capsys):
    sr_dir, gt_dir = folders
    out = tmp_path / "scores.json"
    code = main(["evaluate", str(sr_dir), "--gt", str(gt_dir), "--metrics", "psnr,ssim", "--format", "json",
                 "-o", str(out)])
    assert code == 0
    assert set(json.loads(out.read_text())["summary"]) == {"psnr", "ssim"}
    assert main(["evaluate", str(sr_dir), "--gt", str(gt_dir), "--metrics", "psnr,bogus"]) == 2
    assert "unknown metric 'bogus'" in capsys.readouterr().err


def test_cli_evaluate_reports_unavailable_metric_and_still_scores(folders, no_weight_cache, tmp_path, capsys):
    sr_dir, gt_dir = folders
    code = main(["evaluate", str(sr_dir), "--gt", str(gt_dir), "--metrics", "psnr,dists", "--offline",
                 "--metric-weights", str(tmp_path / "none")])
    captured = capsys.readouterr()
    assert code == 1
    assert "| mean | 26.78" in captured.out
    assert "dists not computed: missing weights file DISTS_weights-f5e65c96.pth" in captured.err
