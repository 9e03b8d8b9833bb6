"""The one read -> upscale -> write loop, used by `diffsr upscale` and by the benchmark (and so `evaluate --runs`).

First the plan: every input's output name, refusing (one line each, on every run) two inputs that ask for one
output and an output that is one of the inputs; outputs that exist already are skipped unless overwriting.
Then each image is upscaled and written through a temporary; a failure of one image is one line and the
others go on. In a launched job (torchrun, accelerate launch) or with --shard, `plan_share` gives each
process its part (diffsr.distributed) and `Tally` gathers what every process did into one summary.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from diffsr.distributed import Processes, pixel_counts
from diffsr.errors import DiffsrError, OutputError, first_line
from diffsr.images import OUTPUT_FORMATS, Picture, write_image


@dataclass
class Plan:
    jobs: list[tuple[Path, Path]] = field(default_factory=list)  # (input, output)
    refused: list[str] = field(default_factory=list)  # one line per input that will not be upscaled
    skipped: int = 0  # inputs whose output exists (not overwriting)


def output_path(path: Path, output: Path, fmt: str | None = None) -> Path:
    """The input's name in the output folder: its own type if diffsr writes it, else PNG (or `fmt`)."""
    suffix = path.suffix.lower()
    if fmt:
        suffix = OUTPUT_FORMATS[fmt]
    elif suffix.lstrip(".") not in OUTPUT_FORMATS:
        suffix = ".png"
    return output / (path.stem + suffix)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file, following links; None if there is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def plan_outputs(paths: list[Path], output: Path, fmt: str | None = None, overwrite: bool = False) -> Plan:
    plan = Plan()
    inputs = {identity for identity in map(_identity, paths) if identity is not None}
    first_for: dict[Path, Path] = {}
    for path in paths:
        target = output_path(path, output, fmt)
        if target in first_for:  # reported on every run, whether or not the first one's output exists
            plan.refused.append(f"{path}: its output {target} would overwrite the output of {first_for[target]}; "
                                "rename one input")
            continue
        first_for[target] = path
        if _identity(target) in inputs:
            plan.refused.append(f"{path}: its output {target} is an input file, which is never overwritten; "
                                "choose another output folder or --format")
        elif os.path.exists(target) and not overwrite:  # (False for a name too long: that is said on writing)
            plan.skipped += 1
        else:
            plan.jobs.append((path, target))
    return plan


def plan_share(paths: list[Path], output: Path, fmt: str | None, overwrite: bool, processes: Processes) -> Plan:
    """This process's part of the plan. The --shard is taken from all the inputs, so shards started apart agree
    whatever is done already; the main process plans it before anyone writes, and what is left to do is split
    over the processes by pixel count (a resumed job is balanced again). Refusals and skips are the main
    process's to report."""
    if processes.shard:
        paths = processes.shard_of(paths, pixel_counts(paths))

    def make_plan() -> tuple[Plan, list[int]]:
        plan = plan_outputs(paths, output, fmt, overwrite)
        return plan, pixel_counts([source for source, _ in plan.jobs])

    plan, weights = processes.from_main(make_plan)
    jobs = processes.part(plan.jobs, weights)
    return Plan(jobs, plan.refused, plan.skipped) if processes.is_main else Plan(jobs)


@dataclass
class Tally:
    """What one process did."""

    written: int = 0
    skipped: int = 0
    failed: int = 0


def summarize(tallies: list[Tally], what: str = "image(s)") -> list[str]:
    """One summary of all processes (gathered in rank order): the total, then one line per process."""
    total = Tally(*(sum(getattr(t, name) for t in tallies) for name in ("written", "skipped", "failed")))

    def line(tally):
        return f"{tally.written} written, {tally.skipped} skipped (already there), {tally.failed} failed"

    lines = [f"{what}: {line(total)}"]
    if len(tallies) > 1:
        lines += [f"  process {rank}: {line(tally)}" for rank, tally in enumerate(tallies)]
    return lines


def upscale_all(jobs: Iterable[tuple[Path, Path]], upscale: Callable[[Path], Picture],
                report: Callable[[str, str], None]) -> int:
    """Upscale and write every (input, output) job; `report(kind, line)` gets each 'error' (the image is
    left out, the others go on) and 'warning' as it happens. Returns how many images were written."""
    written = 0
    for source, target in jobs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = upscale(source)
                write_image(target, result.rgb, result.alpha, result.icc_profile, result.exif)
                written += 1
            except OutputError as error:  # names the output: say which input it was for
                report("error", f"{source}: not written: {error}")
            except DiffsrError as error:  # names the input already
                report("error", str(error))
            except (RuntimeError, MemoryError) as error:  # e.g. out of memory on the device
                report("error", f"{source}: {first_line(error)}")
        for warning in caught:
            report("warning", str(warning.message))
    return written
