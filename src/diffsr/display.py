"""What the command line shows on stderr while a batch upscales (`upscale`, `evaluate --runs`, `benchmark`).

One display, fed by diffsr.batch: on a terminal, a tqdm bar over the images and one for the current image's
phase (encode, denoise, decode: diffsr.progress Steps, whose totals are known when the phase begins) with tqdm's
ETA, redrawn every few seconds; elsewhere (a log, a pipe) plain lines with no escape codes or carriage returns: one when a phase begins,
then at most one every `every` seconds, and one when the image is upscaled. A phase of fewer than MIN_UNITS units
shows nothing: a one-step method on a small image has nothing to wait for. Messages go through `write`, which
never glues them to a bar (tqdm.write).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from diffsr.progress import Step

PLAIN_EVERY = 10.0  # seconds between two plain lines of one image's phase
REFRESH_EVERY = 2.0  # seconds between two redraws of a terminal bar while a unit runs
MIN_UNITS = 2  # a phase shorter than this gets no bar and no line


def duration(seconds: float) -> str:
    """'45 s', '3 min', '1 h 5 min': an ETA for people (tqdm's format_interval writes 00:45)."""
    seconds = max(0, round(seconds))
    if seconds < 100:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class Display:
    """Progress of the batches of one command, and its messages. `quiet`: messages only."""

    every = PLAIN_EVERY
    refresh_every = REFRESH_EVERY

    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.terminal = self.stream.isatty()
        self.images_bar: tqdm | None = None
        self.phase_bar: tqdm | None = None
        self.count = self.index = 0
        self.name, self.phase = "", None
        self.last_unit = self.phase_started = self.last_line = 0.0
        self.stop_refresh: threading.Event | None = None

    def write(self, line: str, file=None) -> None:
        """A message on its own line (above the bars on a terminal), on stderr or `file` (e.g. stdout)."""
        file = file if file is not None else self.stream
        if self.terminal:
            tqdm.write(line, file=file)  # clears and redraws the bars, also for stdout beside them
        else:
            print(line, file=file, flush=True)

    # -- what diffsr.batch calls ---------------------------------------------------------------------
    def batch(self, title: str, count: int) -> None:
        """A batch of `count` images begins."""
        self.end()
        self.count, self.index = count, 0
        if not self.quiet and self.terminal:
            self.images_bar = tqdm(total=count, desc=title, unit="image", file=self.stream)
            self.stop_refresh = threading.Event()
            threading.Thread(target=self._refresh, args=(self.stop_refresh,), daemon=True).start()

    def _refresh(self, stop: threading.Event) -> None:
        """Redraw the bars every refresh_every seconds: tqdm redraws only when a unit ends, and one VAE tile can
        take a minute on a CPU (the elapsed time and ETA must not stand still). tqdm's lock keeps the redraws
        apart from the updates; a closed bar does not redraw."""
        while not stop.wait(self.refresh_every):
            for bar in (self.images_bar, self.phase_bar):
                if bar is not None:
                    bar.refresh()

    def start(self, source: Path) -> None:
        self.name, self.phase = Path(source).name, None
        self.index += 1
        self.last_unit = self.last_line = time.monotonic()

    def step(self, step: Step) -> None:
        """One unit of the image's work finished (the `callback=` of Upscaler.upscale)."""
        now = time.monotonic()
        new_phase = step.phase != self.phase
        if new_phase:  # the phase began when the one before it ended
            self.phase, self.phase_started = step.phase, self.last_unit
        self.last_unit = now
        if self.quiet or step.total < MIN_UNITS:
            return
        if self.terminal:
            self._bar(step, new_phase)
        elif new_phase or now - self.last_line >= self.every:
            left = (now - self.phase_started) / step.done * (step.total - step.done)
            self.write(f"diffsr: {self.name}: {step.phase} {step.done}/{step.total} "
                       f"({100 * step.done // step.total}%), about {duration(left)} left")
            self.last_line = now

    def _bar(self, step: Step, new_phase: bool) -> None:
        description = f"{self.name}: {step.phase}"
        if self.phase_bar is None:
            self.phase_bar = tqdm(total=step.total, desc=description, unit="tile", file=self.stream, leave=False)
        elif new_phase:
            self.phase_bar.reset(total=step.total)  # the ETA starts again with the phase
            self.phase_bar.set_description(description, refresh=False)
        self.phase_bar.total = step.total  # grows when a method runs a phase again
        self.phase_bar.update(step.done - self.phase_bar.n)

    def finish(self, source: Path, seconds: float, upscaled: bool) -> None:
        """The image is done: upscaled (and being written), or failed (its error line is said apart)."""
        if self.phase_bar is not None:
            self.phase_bar.close()
            self.phase_bar = None
        if self.images_bar is not None:
            self.images_bar.update(1)
        elif upscaled and not self.quiet:
            self.write(f"diffsr: [{self.index}/{self.count}] {self.name}: upscaled in {seconds:.1f} s")

    def end(self) -> None:
        """The batch is over: its bars are closed."""
        if self.stop_refresh is not None:
            self.stop_refresh.set()
            self.stop_refresh = None
        for bar in (self.phase_bar, self.images_bar):
            if bar is not None:
                bar.close()
        self.phase_bar = self.images_bar = None
