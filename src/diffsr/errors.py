"""Errors that carry one clear line for the user: what file, what is wrong."""


class DiffsrError(Exception):
    """Base class; str(error) is the one line shown to the user."""


class ImageError(DiffsrError):
    """An input image is missing, unreadable, truncated or not an image."""


class OutputError(DiffsrError):
    """A result cannot be written (disk full, name too long, folder not writable)."""


class WeightsError(DiffsrError):
    """A weights file is missing, corrupt, or belongs to another method."""


class BaseModelError(DiffsrError):
    """The Stable Diffusion base (hub id or folder) is missing or incomplete."""


class UsageError(DiffsrError, ValueError):
    """A knob is out of range or a combination of options is invalid."""


class ArgumentTypeError(DiffsrError, TypeError):
    """An argument of the wrong type (a scale given as text, a seed as a float)."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (or its type name): the one line a user sees of an
    error raised by a library underneath."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
