"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations


class SftmixError(Exception):
    """An error caused by the user's input or environment, reported as one clear message."""


class ConfigError(SftmixError):
    """A config key, value or file is invalid."""


class DataError(SftmixError):
    """A data file cannot be read or parsed; the message names the file and the position."""


class RowRejected(Exception):
    """One row of a corpus is invalid; `reason` says why, `kind` names the class of problem
    (`too_long`, `starts_with_assistant`, ...) for counting. Counted and reported, never silent."""

    def __init__(self, reason: str, kind: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
