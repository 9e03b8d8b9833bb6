"""The one read -> upscale -> write loop, with its report: used by `diffsr upscale` (and so the demo), the
benchmark (and so `evaluate --runs`), the web app and training validation.

First the plan: every input's output name, refusing (one line each, on every run) two inputs that ask for one
output and an output that is one of the inputs; outputs that exist already are skipped unless overwriting.
Then each image is upscaled and written through a temporary, while the next one upscales; a failure of one image
is one line and the others go on. In a launched job (torchrun, accelerate launch) or with --shard, `plan_share`
gives each process its part (diffsr.distributed) and `Tally` gathers what every process did into one summary.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from diffsr.distributed import Processes, pixel_counts
from diffsr.errors import DiffsrError, OutputError, first_line
from diffsr.images import OUTPUT_FORMATS, Picture, image_encoder, write_atomically
from diffsr.progress import Callback, Step


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


@dataclass
class Report:
    """What one batch did."""

    written: list[Path] = field(default_factory=list)  # the outputs written
    skipped: int = 0  # inputs whose output was there already (not overwriting)
    failures: list[str] = field(default_factory=list)  # one line per input not written, the plan's refusals first
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # spent reading and upscaling (not writing)

    def tally(self) -> Tally:
        return Tally(len(self.written), self.skipped, len(self.failures))


class Display(Protocol):
    """What the loop tells of its progress (diffsr.display.Display on the command line)."""

    def batch(self, title: str, count: int) -> None: ...
    def start(self, source: Path) -> None: ...
    def step(self, step: Step) -> None: ...
    def finish(self, source: Path, seconds: float, upscaled: bool) -> None: ...
    def end(self) -> None: ...


# Outputs up to this many pixels are written in a background thread while the next image upscales (PIL and
# OpenCV encode without the GIL; a 512 px PNG takes about as long as a one-step upscale on a GPU). Larger ones
# are written before the next image starts: their upscale dwarfs the write, and two held at once would raise
# the batch's memory bound.
BACKGROUND_WRITE_PIXELS = 4096 * 4096


def upscale_all(plan: Plan, upscale: Callable[[Path, Callback | None], Picture],
                say: Callable[[str, str], None] | None = None, display: Display | None = None,
                title: str = "") -> Report:
    """THE read -> upscale -> write loop: `upscale(source, callback)` reads and upscales one input (passing
    `callback` on as Upscaler.upscale's, for the display), the loop writes it through a temporary, in the
    background while the next input upscales (see BACKGROUND_WRITE_PIXELS); every write is complete when this
    returns, also when it is interrupted. A failure of one image is one line (the image is left out, the others go
    on); `say(kind, line)` hears each 'error' and 'warning' as it happens, and the report keeps them."""
    report = Report(skipped=plan.skipped, failures=list(plan.refused))
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffsr-write")
    writing: tuple[Path, Path, Future] | None = None  # (input, output, its write) while the next image upscales

    def tell(kind: str, line: str) -> None:
        (report.failures if kind == "error" else report.warnings).append(line)
        if say is not None:
            say(kind, line)

    def settle() -> None:
        """Wait for the write under way, and report it."""
        nonlocal writing
        if writing is not None:
            source, target, write = writing
            writing = None
            try:
                write.result()
                report.written.append(target)
            except OutputError as error:  # names the output: say which input it was for
                tell("error", f"{source}: not written: {error}")

    if display is not None:
        display.batch(title, len(plan.jobs))
    try:
        for source, target in plan.jobs:
            encode = failure = None
            if display is not None:
                display.start(source)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result = upscale(source, display.step if display is not None else None)
                    report.seconds += time.perf_counter() - start
                    encode = image_encoder(target, result.rgb, result.alpha, result.icc_profile, result.exif)
                except OutputError as error:
                    failure = f"{source}: not written: {error}"
                except DiffsrError as error:  # names the input already
                    failure = str(error)
                except (RuntimeError, MemoryError) as error:  # e.g. out of memory on the device
                    failure = f"{source}: {first_line(error)}"
            settle()  # the image before: written while this one upscaled (its lines come first)
            if failure is not None:
                tell("error", failure)
            if encode is not None:
                writing = source, target, writer.submit(write_atomically, target, encode)
                if result.rgb.shape[0] * result.rgb.shape[1] > BACKGROUND_WRITE_PIXELS:
                    settle()
            if display is not None:
                display.finish(source, time.perf_counter() - start, encode is not None)
            for warning in caught:  # named by their input, as failures are
                message = str(warning.message)
                tell("warning", message if source.name in message else f"{source}: {message}")
        settle()
    finally:
        writer.shutdown()  # (waits: an interrupted batch still completes the write under way)
        if display is not None:
            display.end()
    return report
