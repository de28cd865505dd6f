"""The errors a stage turns into a clear message and a non-zero exit, each naming what to change."""

from __future__ import annotations


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and the fix."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what to fix."""


class StageError(RuntimeError):
    """A stage that cannot go on; the message says what was wrong and what to change."""
