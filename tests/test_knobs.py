"""The knob dataclass base (diffsr.knobs): one check per call, by name, before any work."""

import pytest

from diffsr.errors import UsageError
from diffsr.knobs import Knobs, knob
from dataclasses import dataclass


@dataclass(frozen=True)
class Example(Knobs):
    steps: int = knob(4, "sampler steps", low=1)
    strength: float = knob(0.5, "how strong", low=0, high=1)
    scale: float = knob(1.0, "guidance", low=0, low_open=True)
    sampler: str = knob("ddpm", "sampler", choices=("ddpm", "ddim"))
    flag: bool = knob(False, "a switch")
    maybe: float | None = knob(None, "optional", kind=float, low=0)

    def check(self):
        if self.steps == 3 and self.sampler == "ddim":
            raise UsageError("ddim cannot take 3 steps here")


def test_defaults_variant_defaults_and_given_values_in_that_order():
    assert Example.from_call({}).as_dict() == dict(steps=4, strength=0.5, scale=1.0, sampler="ddpm", flag=False,
                                                   maybe=None)
    knobs = Example.from_call({"steps": None, "strength": 0.25}, defaults={"steps": 9, "strength": 0.75})
    assert (knobs.steps, knobs.strength) == (9, 0.25)


@pytest.mark.parametrize("given, message", [
    ({"stpes": 2}, "no option stpes"),
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": True}, "steps must be a whole number"),
    ({"strength": 1.5}, "strength must be at most 1 and at least 0, got 1.5"),
    ({"strength": float("nan")}, "strength must be a finite number"),
    ({"scale": 0}, "scale must be above 0"),
    ({"sampler": "euler"}, "unknown sampler 'euler' (choose ddpm, ddim)"),
    ({"flag": "yes"}, "flag must be true or false"),
    ({"maybe": -1.0}, "maybe must be at least 0"),
    ({"steps": 3, "sampler": "ddim"}, "ddim cannot take 3 steps here"),
])
def test_bad_values_are_one_line_naming_the_knob(given, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Example.from_call(given)


def test_knobs_are_frozen():
    with pytest.raises(Exception):
        Example().steps = 5
