"""Images per second of `diffsr upscale` with 1 and 2 processes (torchrun, CPU, gloo), and the parallel efficiency.

Each process count runs twice, on N and on 2N images, each a fresh `torchrun ... -m diffsr.cli upscale` job: the
difference (N images in t(2N) - t(N) seconds) is the throughput once the processes run, without the start-up and
model loading that every job pays once; the end-to-end rate of the 2N-image job is given as well. On a shared
machine the jobs are interleaved (1, 2, 1, 2, ... processes) --repeats times and each time is the best of its
repeats, so a burst of other work hits every process count alike and is mostly left out. The model is
the tiny test model (diffsr.testing) on --size px inputs (OSEDiff works at 512 px and more, whatever the input),
each process on one thread. The outputs of every process count are checked to be the same bytes.

    PYTHONPATH=src python benchmarks/parallel_scaling.py --images 4 --processes 1,2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def machine() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return f"{fields.get('Model name', platform.processor()).strip()}, {os.cpu_count()} logical cores"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def upscale_job(processes: int, inputs: Path, output: Path, base: Path, weights: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "diffsr.cli", "upscale", str(inputs), "-o", str(output), "--method", "osediff",
               "--base", str(base), "--weights", str(weights), "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"upscale with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    import torch

    from diffsr.testing import make_tiny_base, make_tiny_weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="N: the jobs upscale N and 2N images")
    parser.add_argument("--size", type=int, default=32, help="input side in px")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every job; the best time is kept")
    args = parser.parse_args()
    counts = [int(p) for p in args.processes.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base = make_tiny_base(root / "sd21-tiny")
        weights = make_tiny_weights("osediff", base, root / "osediff.pkl")
        rng = np.random.default_rng(0)
        folders = {}
        for n in (args.images, 2 * args.images):
            folders[n] = root / f"in{n}"
            folders[n].mkdir()
            for i in range(n):
                pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folders[n] / f"{i:04d}.png")

        loads = [load()]
        times: dict[tuple[int, int], float] = {}
        for repeat in range(args.repeats):
            for processes in counts:
                for n, folder in folders.items():
                    out = root / f"out{processes}-{n}-{repeat}"
                    seconds = upscale_job(processes, folder, out, base, weights)
                    times[processes, n] = min(seconds, times.get((processes, n), seconds))
            loads.append(load())
        outputs = {(p, r): {f.name: f.read_bytes() for f in sorted((root / f"out{p}-{2 * args.images}-{r}").iterdir())}
                   for p in counts for r in range(args.repeats)}
        same = all(o == outputs[counts[0], 0] for o in outputs.values())
        rows = []
        for processes in counts:
            t_n, t_2n = times[processes, args.images], times[processes, 2 * args.images]
            rows.append((processes, t_n, t_2n, args.images / (t_2n - t_n), 2 * args.images / t_2n))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"# diffsr upscale: data-parallel scaling on CPU ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n")
    print(f"- machine: {machine()}; torch {torch.__version__}; commit {commit}")
    print(f"- tiny OSEDiff (diffsr.testing), {args.size} px inputs (processed at 512 px), x4, one thread per process;"
          f" jobs of N = {args.images} and 2N = {2 * args.images} images")
    print(f"- best of {args.repeats} interleaved runs per job; load average (1, 5, 15 min) before and after each round: "
          f"{' | '.join(loads)} ({os.cpu_count()} cores; a load above the job's own processes is other work)")
    print(f"- outputs of every process count the same bytes: {'yes' if same else 'NO'}\n")
    print("| processes | job N (s) | job 2N (s) | images/s, running (N / (t2N - tN)) | images/s, end to end (2N job) "
          "| parallel efficiency (running) |")
    print("|---:|---:|---:|---:|---:|---:|")
    single = rows[0][3]
    for processes, t_n, t_2n, marginal, end_to_end in rows:
        efficiency = marginal / (single * processes / rows[0][0])
        print(f"| {processes} | {t_n:.1f} | {t_2n:.1f} | {marginal:.3f} | {end_to_end:.3f} | {efficiency:.0%} |")


if __name__ == "__main__":
    main()
