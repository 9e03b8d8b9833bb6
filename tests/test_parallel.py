"""Data-parallel runs: the split, --shard, and two CPU processes under torchrun (gloo) giving one process's files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import smooth_image
from metric_helpers import metric_weights  # noqa: F401  (fixture)
from diffsr.cli import main
from diffsr.distributed import Processes, parse_shard, split
from diffsr.errors import UsageError
from diffsr.images import is_image_name

SRC = Path(__file__).resolve().parents[1] / "src"

# One thread here as in each torchrun process (OMP_NUM_THREADS=1): the number of threads may change float sums,
# and the in-process run is the single-process reference.
pytestmark = pytest.mark.usefixtures("one_thread")


# Inputs are not enlarged to the release's 512 px first: the same checks in a few seconds per run.
SMALL = ["--process-size", "64"]


def model_args(tiny_base, osediff_weights):
    return ["--method", "osediff", "--base", str(tiny_base), "--weights", str(osediff_weights), *SMALL, "--quiet"]


@pytest.fixture()
def inputs(tmp_path):
    """Images of different sizes (one much larger), and a file that is not an image."""
    folder = tmp_path / "in"
    folder.mkdir()
    for seed, (height, width) in enumerate([(12, 14), (40, 36), (9, 12)]):
        Image.fromarray(smooth_image(height, width, seed=seed)).save(folder / f"im{seed}.png")
    return folder


def images(folder: Path) -> dict[str, bytes]:
    """The finished images of a folder (never a temporary of an interrupted write), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if is_image_name(p)}


def torchrun(*args, processes=2, check=True, **popen):
    """`torchrun --nproc_per_node 2 -m diffsr.cli ARGS` with one thread per process (2 cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "diffsr.cli", *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_split_balances_pixels_and_is_deterministic():
    weights = [100, 1, 1, 1, 1, 60, 50, 1]
    parts = split(weights, 2)
    assert parts == split(weights, 2)
    assert sorted(i for part in parts for i in part) == list(range(8))  # every item once
    loads = [sum(weights[i] for i in part) for part in parts]
    assert parts == [[0, 1, 2, 3, 4, 7], [5, 6]] and loads == [105, 110]  # by weight, not by count
    assert split([1] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert split([5, 5], 3) == [[0], [1], []]  # more processes than items: some get none


def test_shard_and_processes_nest():
    items, weights = list("abcdef"), [6, 5, 4, 3, 2, 1]
    shard = Processes(shard=(1, 2)).shard_of(items, weights)
    assert shard == Processes(shard=(1, 2)).shard_of(items, weights) and shard == ["b", "c", "f"]
    # Under a launch the processes split the shard: together they do exactly the shard.
    assert sorted(Processes(0, 2).part(shard, [5, 4, 1]) + Processes(1, 2).part(shard, [5, 4, 1])) == shard


def test_a_left_temporary_is_not_a_done_output(inputs, tmp_path):
    """A process killed mid-write leaves only its temporary: the rerun's plan still has that image to do."""
    from diffsr.batch import plan_share

    out = tmp_path / "out"
    out.mkdir()
    (out / ".im0.k3j9x.partial.png").write_bytes(b"half an image")  # as write_atomically names its temporaries
    (out / "im1.png").write_bytes(b"done")
    plan = plan_share(sorted(inputs.iterdir()), out, None, False, Processes())
    assert [source.name for source, _ in plan.jobs] == ["im0.png", "im2.png"] and plan.skipped == 1


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/2", "2", "1/2/3", "-1/2"])
def test_bad_shards_are_one_line_usage_errors(text, capsys):
    with pytest.raises(UsageError, match=r"expected I/N"):
        parse_shard(text)
    with pytest.raises(SystemExit) as stop:
        main(["upscale", "x.png", "-o", "out", f"--shard={text}"])
    assert stop.value.code == 2
    assert f"argument --shard: {text}: expected I/N" in capsys.readouterr().err
    assert parse_shard("2/3") == (1, 3)


def test_shards_together_equal_the_whole(inputs, tmp_path, tiny_base, osediff_weights, capsys):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    args = model_args(tiny_base, osediff_weights)
    assert main(["upscale", str(inputs), "-o", str(whole)] + args) == 0
    assert main(["upscale", str(inputs), "-o", str(sharded), "--shard", "1/2"] + args) == 0
    first = images(sharded)
    assert main(["upscale", str(inputs), "-o", str(sharded), "--shard", "2/2"] + args) == 0
    assert images(sharded) == images(whole) and len(images(whole)) == 3
    # Split by pixels, not by count: the large image (1440 px) outweighs the two others (276 px) together.
    assert list(first) == ["im1.png"]
    # A shard run again finds its part done, whatever the other shard did.
    capsys.readouterr()
    assert main(["upscale", str(inputs), "-o", str(sharded), "--shard", "1/2", "--method", "osediff",
                 "--base", str(tiny_base), "--weights", str(osediff_weights)]) == 0
    assert f"0 written, {len(first)} skipped (already there), 0 failed" in capsys.readouterr().err


def test_two_processes_write_what_one_writes(inputs, tmp_path, tiny_base, osediff_weights):
    """torchrun with two CPU processes: the same bytes as one process, one summary, one exit code."""
    (inputs / "broken.png").write_text("not an image")  # fails in one process; the others are still written
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["upscale", str(inputs), "-o", str(one)] + model_args(tiny_base, osediff_weights)) == 1
    done = torchrun("upscale", inputs, "-o", two, "--method", "osediff", "--base", tiny_base,
                    "--weights", osediff_weights, *SMALL, "--seed", "0")
    assert done.returncode == 1, done.stderr[-3000:]  # the failure in one process is the job's exit code
    assert images(two) == images(one) and len(images(one)) == 3
    err = done.stderr
    assert err.count("image(s): 3 written, 0 skipped (already there), 1 failed") == 1  # said once, by rank 0
    assert err.count("process 0:") == 1 and err.count("process 1:") == 1
    assert err.count("broken.png: not an image") == 1 and "] diffsr: error:" in err  # said by its process


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_two_processes_score_what_one_scores(tmp_path, metric_weights):  # noqa: F811
    """evaluate under torchrun: per-image scores and problems as one process's, FID to float precision."""
    import synthetic

    sr_dir, gt_dir = synthetic.write_image_folders(tmp_path)
    (sr_dir / "extra.png").write_bytes((sr_dir / "a.png").read_bytes())  # no ground truth: a problem line
    args = ["evaluate", sr_dir, "--gt", gt_dir, "--metrics", "psnr,ssim,lpips,niqe,fid", "--metric-weights",
            metric_weights, "--offline", "--format", "json", "--quiet", "-o"]
    assert main([str(a) for a in args] + [str(tmp_path / "one.json")]) == 1  # 1: the problem line
    done = torchrun(*args, tmp_path / "two.json")
    assert done.returncode == 1, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["per_image"] == one["per_image"] and list(two["per_image"]) == ["a.png", "b.png", "c.png"]
    assert two["problems"] == one["problems"] and len(one["problems"]) == 1
    assert two["unavailable"] == one["unavailable"] == {}
    assert two["summary"]["fid"] == pytest.approx(one["summary"]["fid"], rel=1e-6, abs=1e-6)
    assert {k: v for k, v in two["summary"].items() if k != "fid"} == \
        {k: v for k, v in one["summary"].items() if k != "fid"}


@pytest.mark.slow
def test_a_killed_process_is_finished_by_the_rerun(inputs, tmp_path, tiny_base, osediff_weights):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["upscale", inputs, "-o", two, "--method", "osediff", "--base", tiny_base, "--weights", osediff_weights,
            *SMALL]
    for seed in range(3, 9):
        Image.fromarray(smooth_image(14, 14, seed=seed)).save(inputs / f"more{seed}.png")
    assert main(["upscale", str(inputs), "-o", str(one)] + model_args(tiny_base, osediff_weights)) == 0
    job = torchrun(*args, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (two.is_dir() and images(two)):
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.02)
        os.kill(_worker(job.pid, rank=1), signal.SIGKILL)
        job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert 0 < len(images(two)) < 9  # stopped midway
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert images(two) == images(one) and len(images(one)) == 9
    assert "skipped (already there)" in done.stderr


def _worker(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.slow
def test_shards_under_torchrun_equal_the_whole(inputs, tmp_path, tiny_base, osediff_weights):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["upscale", str(inputs), "-o", str(one)] + model_args(tiny_base, osediff_weights)) == 0
    for shard in ("1/2", "2/2"):
        done = torchrun("upscale", inputs, "-o", two, "--shard", shard, *model_args(tiny_base, osediff_weights))
        assert done.returncode == 0, done.stderr[-3000:]
    assert images(two) == images(one)


def _hr_folder(tmp_path):
    folder = tmp_path / "hr_in"
    folder.mkdir()
    for seed, size in enumerate([(80, 96), (72, 72), (64, 70)]):
        Image.fromarray(smooth_image(*size, seed=seed)).save(folder / f"hr{seed}.png")
    return folder


def _degrade_args(hr, out, *extra):
    return ["degrade", str(hr), "-o", str(out), "--crop", "64", "--count", "7", "--seed", "3", "--batch-size", "2",
            "--quiet", *extra]


def _test_set(out: Path) -> dict[str, bytes]:
    return {f"{part}/{name}": data for part in ("hr", "lr") for name, data in images(out / part).items()}


def test_degrade_shards_together_equal_the_whole(tmp_path, capsys):
    hr = _hr_folder(tmp_path)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(_degrade_args(hr, whole)) == 0
    assert main(_degrade_args(hr, sharded, "--shard", "2/2")) == 0
    assert len(_test_set(sharded)) == 2 * 3  # pairs 1, 3, 5
    assert main(_degrade_args(hr, sharded, "--shard", "1/2")) == 0
    assert _test_set(sharded) == _test_set(whole) and len(_test_set(whole)) == 2 * 7
    assert (sharded / "pairs.json").read_bytes() == (whole / "pairs.json").read_bytes()


@pytest.mark.slow
def test_degrade_with_two_processes_writes_the_same_pairs(tmp_path):
    hr = _hr_folder(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_degrade_args(hr, one)) == 0
    done = torchrun(*_degrade_args(hr, two)[:-1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _test_set(two) == _test_set(one) and (two / "pairs.json").read_bytes() == (one / "pairs.json").read_bytes()
    assert done.stderr.count("pairs: 7 written, 0 skipped (already there), 0 failed") == 1


@pytest.mark.slow
def test_benchmark_with_two_processes_equals_one(inputs, tmp_path, tiny_base, osediff_weights, metric_weights):  # noqa: F811
    gt = tmp_path / "gt"
    gt.mkdir()
    for path in sorted(inputs.iterdir()):
        width, height = Image.open(path).size
        Image.fromarray(smooth_image(height * 4, width * 4, seed=7)).save(gt / path.name)
    args = ["benchmark", "--methods", "bicubic,osediff", "--lr", inputs, "--gt", gt, "--metrics", "psnr,lpips,fid",
            "--metric-weights", metric_weights, "--offline", "--base", tiny_base,
            "--weights", f"osediff={osediff_weights}", "--quiet", "-o"]
    assert main([str(a) for a in args] + [str(tmp_path / "one")]) == 0
    done = torchrun(*args, tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    for method in ("bicubic", "osediff"):
        assert images(tmp_path / "two" / method) == images(tmp_path / "one" / method) != {}
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    for first, second in zip(one["methods"], two["methods"], strict=True):
        assert second["evaluation"]["per_image"] == first["evaluation"]["per_image"]
        assert second["evaluation"]["summary"]["fid"] == pytest.approx(first["evaluation"]["summary"]["fid"], rel=1e-6)


@pytest.mark.slow
def test_evaluate_runs_with_two_processes_equals_one(inputs, tmp_path, tiny_base, osediff_weights, metric_weights):  # noqa: F811
    gt = tmp_path / "gt"
    gt.mkdir()
    for path in sorted(inputs.iterdir()):
        width, height = Image.open(path).size
        Image.fromarray(smooth_image(height * 4, width * 4, seed=7)).save(gt / path.name)
    args = ["evaluate", "--lr", inputs, "--gt", gt, "--runs", "2", "--metrics", "psnr,fid", "--metric-weights",
            metric_weights, "--offline", "--format", "json", "--quiet", *model_args(tiny_base, osediff_weights)[:-1]]
    assert main([str(a) for a in args] + ["--work-dir", str(tmp_path / "w1"), "-o", str(tmp_path / "one.json")]) == 0
    refused = torchrun(*args, "-o", tmp_path / "no-work-dir.json")  # every process must see one folder
    assert refused.returncode != 0 and refused.stderr.count("--runs in a launched job: give --work-dir") == 1
    done = torchrun(*args, "--work-dir", tmp_path / "w2", "-o", tmp_path / "two.json")
    assert done.returncode == 0, done.stderr[-3000:]
    for seed in ("seed0", "seed1"):
        assert images(tmp_path / "w2" / "osediff" / seed) == images(tmp_path / "w1" / "osediff" / seed) != {}
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [r["per_image"] for r in two["per_run"]] == [r["per_image"] for r in one["per_run"]]
    assert two["g_std"] == one["g_std"] and two["l_std"] == one["l_std"]
    assert two["summary"]["fid"] == pytest.approx(one["summary"]["fid"], rel=1e-6)
