"""Errors meant for the user: the CLI prints them as one line and exits non-zero.

Raise `StitchError` (or a subclass) with a message that names the file, sample or field at fault.
"""


class StitchError(Exception):
    """A user-facing error; `code` is the process exit status the CLI uses."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class StitchConfigError(StitchError, ValueError):
    """A config that cannot be used; the message names the file and the field."""


class CheckpointError(StitchError):
    """A checkpoint that cannot be read or written; the message names the file and tensor."""


class DataError(StitchError):
    """Data that cannot be used; the message names the file, line or sample."""
