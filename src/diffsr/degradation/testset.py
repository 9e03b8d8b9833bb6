"""Paired synthetic test sets: random HR crops degraded to LR, with the parameters of every pair recorded.

OUT/hr/00000.png, OUT/lr/00000.png, ... and OUT/pairs.json (the config, and for every pair its source
image, crop box and degradation parameters: `apply_degradation` on that crop with those parameters
re-makes the LR). Pair i draws everything from its own generator, seeded from (seed, i), so an
interrupted run resumes where it stopped and gives the same pairs as an uninterrupted one, and the processes of
a launched job (torchrun, accelerate launch) or the shards of --shard I/N each write their part of the same set.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffsr.batch import Tally
from diffsr.degradation.config import DegradationConfig, load_config
from diffsr.distributed import Processes
from diffsr.degradation.pipeline import apply_degradation, sample_params
from diffsr.errors import ImageError, OutputError, UsageError
from diffsr.images import (check_output_folder, collect_inputs, image_size, read_image, tensor_to_array,
                           write_atomically, write_image)

PAIRS_FILE = "pairs.json"


def pair_seed(seed: int, index: int) -> int:
    """A seed for pair `index` of a set made with `seed`, independent of every other pair."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class TestSetReport:
    written: int = 0
    already_there: int = 0
    too_small: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "path: reason"
    failed: list[str] = field(default_factory=list)  # pairs not written, "name: reason"
    tallies: list[Tally] = field(default_factory=list)  # what each process did (one entry outside a launch)


def plan_pairs(sources: list[tuple[Path, tuple[int, int]]], config: DegradationConfig, crop: int, count: int,
               seed: int) -> list[dict]:
    """Source, crop box and degradation parameters of every pair; sources are spread evenly over the pairs."""
    pairs = []
    for index in range(count):
        path, (height, width) = sources[index * len(sources) // count]
        generator = torch.Generator().manual_seed(pair_seed(seed, index))
        top = int(torch.randint(height - crop + 1, (), generator=generator))
        left = int(torch.randint(width - crop + 1, (), generator=generator))
        pairs.append({"index": index, "name": f"{index:05d}.png", "source": path.name, "crop": [top, left, crop],
                      "params": sample_params(config, generator, 1)[0]})
    return pairs


def make_test_set(hr_dir: str | Path, out: str | Path, crop: int = 512, count: int = 3000, seed: int = 0,
                  config: str | Path | DegradationConfig | None = None, scale: int | None = None, device="cpu",
                  batch_size: int = 16, quiet: bool = False, processes: Processes | None = None) -> TestSetReport:
    """Write `count` LR/HR pairs made from random `crop` x `crop` crops of the images in `hr_dir`. With
    `processes` (a launched job and/or a --shard), this process writes its part; the report is the job's."""
    processes = processes or Processes()
    from tqdm import tqdm

    hr_dir, out = Path(hr_dir), Path(out)
    config = load_config(config)  # None: the Real-ESRGAN x4 defaults
    if scale is not None:
        config = load_config({**config.to_dict(), "scale": scale})
    if not hr_dir.is_dir():
        raise UsageError(f"{hr_dir}: no such folder")
    if crop % config.scale:
        raise UsageError(f"--crop {crop} is not a multiple of the scale {config.scale}")
    if count < 1 or batch_size < 1:
        raise UsageError("--count and --batch-size must be at least 1")
    check_output_folder(out)  # a file in the way or a read-only folder fails every pair: said before any work

    report = TestSetReport()
    sources = []
    for path in collect_inputs([hr_dir]):
        try:
            size = image_size(path)
        except ImageError as error:
            report.unreadable.append(str(error))
            continue
        if min(size) < crop:
            report.too_small.append(path.name)
        else:
            sources.append((path, size))
    if not quiet and processes.is_main:
        for line in report.unreadable:
            print(f"diffsr: warning: skipping {line}", file=sys.stderr)
        if report.too_small:
            print(f"diffsr: skipping {len(report.too_small)} image(s) smaller than {crop} px", file=sys.stderr)
    if not sources:
        raise UsageError(f"{hr_dir}: no readable image of at least {crop}x{crop} px")

    pairs = plan_pairs(sources, config, crop, count, seed)
    record = {"hr_dir": str(hr_dir), "seed": seed, "crop": crop, "count": count,
              "sources": [p.name for p, _ in sources], "config": config.to_dict(), "pairs": pairs}
    shard = processes.shard_of(pairs, [1] * count)

    def left_to_do() -> list[dict]:  # on the main process, before any process writes
        _write_record(out, record)
        return [p for p in shard if not ((out / "hr" / p["name"]).exists() and (out / "lr" / p["name"]).exists())]

    pending = processes.from_main(left_to_do)
    report.already_there = len(shard) - len(pending) if processes.is_main else 0
    pending = processes.part(pending, [1] * len(pending))  # every pair costs the same
    by_name = {p.name: p for p, _ in sources}
    progress = tqdm(total=report.already_there + len(pending), initial=report.already_there, desc="degrade",
                    unit="pair", disable=quiet or not processes.is_main, file=sys.stderr)
    cache: dict[str, torch.Tensor | ImageError] = {}
    for start in range(0, len(pending), batch_size):
        batch = []
        for pair in pending[start:start + batch_size]:
            image = _load(by_name[pair["source"]], cache)
            if isinstance(image, ImageError):
                report.failed.append(f"{pair['name']}: {image}")
                progress.update(1)
                continue
            top, left, size = pair["crop"]
            batch.append((pair, image[:, top:top + size, left:left + size]))
        if not batch:
            continue
        hr = torch.stack([crop_ for _, crop_ in batch]).to(device)
        with torch.no_grad():
            lr, target = apply_degradation(hr, [pair["params"] for pair, _ in batch], config)
        for row, (pair, _) in enumerate(batch):
            # HR first: a pair counts as done only once its LR exists too.
            try:
                write_image(out / "hr" / pair["name"], tensor_to_array(target[row]))
                write_image(out / "lr" / pair["name"], tensor_to_array(lr[row]))
                report.written += 1
            except OutputError as error:  # e.g. a full disk: named, and the other pairs are still tried
                report.failed.append(str(error))
            progress.update(1)
    progress.close()
    for line in report.failed:  # --quiet silences the progress, never the failures
        processes.say(f"diffsr: error: {line}")
    return _gathered(report, processes)


def _gathered(report: TestSetReport, processes: Processes) -> TestSetReport:
    """The job's report on every process: the counts and failures of all processes."""
    reports = processes.gather(report)
    return TestSetReport(sum(r.written for r in reports), sum(r.already_there for r in reports), report.too_small,
                         report.unreadable, [line for r in reports for line in r.failed],
                         [Tally(r.written, r.already_there, len(r.failed)) for r in reports])


def _load(path: Path, cache: dict) -> torch.Tensor | ImageError:
    """The decoded image (3, H, W) in [0, 1]; pairs come in source order, so only the last one is kept."""
    if path.name not in cache:
        cache.clear()
        try:
            cache[path.name] = read_image(path).to_tensor()[0]
        except ImageError as error:
            cache[path.name] = error
    return cache[path.name]


def _write_record(out: Path, record: dict) -> None:
    """Write OUT/pairs.json; refuse to mix pairs made with other settings into an existing folder."""
    path = out / PAIRS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        settings = ("seed", "crop", "count", "sources", "config")
        if old is None or any(old.get(key) != json.loads(json.dumps(record[key])) for key in settings):
            raise UsageError(f"{out}: holds a test set made with other settings (see {path}); use another folder")
    # One line per pair: readable, and about 1 kB per pair.
    header = ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items() if key != "pairs")
    pairs = ",\n".join("  " + json.dumps(pair) for pair in record["pairs"])
    text = "{\n" + header + ',\n "pairs": [\n' + pairs + "\n ]\n}\n"
    write_atomically(path, lambda file: file.write(text.encode()))  # a failure is one OutputError line
