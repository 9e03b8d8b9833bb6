"""Progress of one upscale call, reported through a `callback=` argument (state passed, not hidden).

The work of one image has three phases: "encode" (VAE encoder tiles), "denoise" (denoiser tile batches, over
every sampler step) and "decode" (VAE decoder tiles). The tiler reports each unit of work as it finishes;
`Progress` turns that into `Step(phase, done, total)` with the phase's total known from the start of the phase
(the denoise total is tiles per pass x the method's passes), so a display can show a bar and an ETA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PHASES = ("encode", "denoise", "decode")


@dataclass(frozen=True)
class Step:
    """One unit of work finished: `done` of `total` units of `phase` (totals grow when a method runs a phase
    twice, e.g. two encodes)."""

    phase: str
    done: int
    total: int


Callback = Callable[[Step], None]


class Progress:
    """Counts one image's work per phase and calls `callback(Step)` after every unit.

    `passes`: how many whole-latent denoiser passes the method will make for this image (sampler steps; two per
    step where a method guides with separate calls), so the denoise total is known at the first tile."""

    def __init__(self, callback: Callback | None = None, passes: int = 1):
        self.callback = callback
        self.passes = max(1, int(passes))
        self.done = {phase: 0 for phase in PHASES}
        self.total = {phase: 0 for phase in PHASES}
        self.passes_started = 0

    def start(self, phase: str, units: int) -> None:
        """A phase run of `units` units begins (for "denoise": one pass of `units` tile batches)."""
        if phase == "denoise":
            self.passes_started += 1
            if self.passes_started == 1:
                self.total[phase] = units * self.passes
            elif self.passes_started > self.passes:  # the method made more passes than it announced
                self.total[phase] += units
        else:
            self.total[phase] += units

    def advance(self, phase: str) -> None:
        """One unit of `phase` finished."""
        self.done[phase] += 1
        self.total[phase] = max(self.total[phase], self.done[phase])
        if self.callback is not None:
            self.callback(Step(phase, self.done[phase], self.total[phase]))

    @property
    def denoiser_passes_done(self) -> int:
        return self.passes_started


