"""User-facing errors.

Every problem a user can fix (a missing file, a bad value, a wrong checkpoint) is raised as a
:class:`MetaLSTMError` with a one-line message that names the file or value and the fix. The CLI
prints that line and exits with status 2; the Python API lets it propagate.
"""

from __future__ import annotations


def printable(message: str) -> str:
    """``message`` on one line: control characters (from user input, e.g. a stray carriage
    return in an argument or a folder name) written as escapes instead of breaking the line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)


class MetaLSTMError(Exception):
    """A problem with the user's input, data or files, explained in one line."""


class DataError(MetaLSTMError):
    """Missing, corrupted or inconsistent data (archives, images, split files, caches)."""


class ConfigError(MetaLSTMError):
    """An unknown preset or config key, or a value of the wrong type or range."""


class CheckpointError(MetaLSTMError):
    """A checkpoint that is missing, corrupted, foreign or of another learner shape."""


class OutputError(MetaLSTMError):
    """A file or folder that cannot be written (read-only, a folder in the way, a full disk)."""
