"""A method's per-call knobs as a frozen dataclass: the papers' names, the release defaults, ranges, help.

Each method declares `class Knobs(diffsr.knobs.Knobs)` with fields made by `knob(...)`; values are checked once,
when an instance is made (`Knobs.from_call`), before any model work. The command line builds its flags, their
help and their per-method groups from the same fields, so a default or range lives in one place.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from diffsr.errors import UsageError


def knob(default: Any, help: str, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, choices: tuple | None = None, kind: type | None = None) -> Any:
    """A knob field. `low`/`high`: inclusive bounds (`low_open`: low itself excluded); `choices`: the allowed
    values; `kind`: the value's type when the default does not tell it (a None default)."""
    kind = kind or (type(default) if default is not None else None)
    return dataclasses.field(default=default, metadata=dict(help=help, low=low, high=high, low_open=low_open,
                                                             choices=choices, kind=kind))


@dataclass(frozen=True)
class Knobs:
    """Base of every method's knobs. Subclasses add fields with `knob(...)` and may override `check` for rules
    across fields (t_min < t_max)."""

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            check_value(spec.name, getattr(self, spec.name), spec.metadata)
        self.check()

    def check(self) -> None:
        """Rules that involve several knobs; raise UsageError."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in dataclasses.fields(cls))

    @classmethod
    def from_call(cls, given: dict, defaults: dict | None = None) -> "Knobs":
        """The knobs of one call: `given` (None values mean "the default") over `defaults` (a variant's release
        defaults) over the fields' own. Unknown names are refused by name."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise UsageError(f"no option {', '.join(unknown)} (options: {', '.join(cls.names())})")
        values = {**(defaults or {}), **{name: value for name, value in given.items() if value is not None}}
        return cls(**values)

    def as_dict(self) -> dict:
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)}


def check_value(name: str, value: Any, rules: dict) -> None:
    """One clear line for a value of the wrong type, out of range or not among the choices."""
    kind = rules.get("kind")
    if value is None:
        return
    if kind is bool and not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise UsageError(f"{name} must be a whole number, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise UsageError(f"{name} must be text, got {value!r}")
    low, high = rules.get("low"), rules.get("high")
    if low is not None and (value < low or (rules.get("low_open") and value == low)):
        bound = f"above {low}" if rules.get("low_open") else f"at least {low}"
        raise UsageError(f"{name} must be {bound}" + (f" and at most {high}" if high is not None else "")
                         + f", got {value!r}")
    if high is not None and value > high:
        raise UsageError(f"{name} must be at most {high}" + (f" and at least {low}" if low is not None else "")
                         + f", got {value!r}")
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise UsageError(f"unknown {name} {value!r} (choose {', '.join(map(str, choices))})")
