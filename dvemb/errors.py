"""Errors raised by the dvemb core.

Every error is a :class:`DvembError` and also inherits the builtin it refines, so callers that
only know Python's builtins still catch it::

    DvembError
    ├── ConfigError(ValueError)            a bad argument; the message names it and the fix
    ├── RecorderError(RuntimeError)        the recorder was used in a way it cannot record
    ├── NumericalError(FloatingPointError) the engine met NaN or infinity; names the step and a likely cause
    └── LogFormatError(ValueError)         a gradient log that cannot be trusted; names the file
        ├── LogVersionError                written by an unknown format version
        ├── NotSafetensorsError            a shard that is not a safetensors file (e.g. a pickle)
        ├── HeaderMismatchError            a header that lies about sizes, or disagrees with the manifest
        ├── TruncatedFileError             fewer bytes than the header or manifest promise
        ├── ChecksumError                  sha256 differs from the manifest
        ├── NonFiniteValueError            NaN or infinity in recorded values
        └── StepContinuityError            missing, repeated or out-of-order steps
"""

from __future__ import annotations

from pathlib import Path


class DvembError(Exception):
    """Base class of every error raised by dvemb."""


class ConfigError(DvembError, ValueError):
    """An argument has a value dvemb cannot work with."""


class RecorderError(DvembError, RuntimeError):
    """The recorder was used in a way it cannot record correctly."""


class NumericalError(DvembError, FloatingPointError):
    """The computation produced NaN or infinity (the message names the step and a likely cause)."""


class LogFormatError(DvembError, ValueError):
    """A gradient log (or one of its files) is malformed.

    Args:
        path: the file (or directory) concerned.
        problem: what is wrong, in words, with the fix where there is one.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class LogVersionError(LogFormatError):
    """The log was written by a format version this dvemb cannot read."""


class NotSafetensorsError(LogFormatError):
    """A shard is not a safetensors file at all (for example a pickle renamed as a shard)."""


class HeaderMismatchError(LogFormatError):
    """A safetensors header is inconsistent with itself, the file or the manifest."""


class TruncatedFileError(LogFormatError):
    """A file is shorter than its header or the manifest says."""


class ChecksumError(LogFormatError):
    """A file's sha256 differs from the one recorded in the manifest."""


class NonFiniteValueError(LogFormatError):
    """Recorded values contain NaN or infinity."""


class StepContinuityError(LogFormatError):
    """Steps are missing, repeated or out of order."""
