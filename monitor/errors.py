"""The data plane's exceptions: one root, a few subclasses that also inherit a built-in."""

from __future__ import annotations


class MonitorError(Exception):
    """Root of every error raised by :mod:`monitor`."""


class ConfigError(MonitorError, ValueError):
    """A setting has an invalid value; the message names the setting, the value and the fix."""


class StorageError(MonitorError):
    """The database could not be reached or refused an operation."""


class SchemaOutOfDate(StorageError):
    """The database schema is behind the code; run ``tunewatch db upgrade``."""


class NotFound(MonitorError, KeyError):
    """A named model, version, event or report does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class ArtifactMismatch(MonitorError, ValueError):
    """A model artifact is missing or its sha256 differs from the registry's."""


class InsufficientData(MonitorError, ValueError):
    """A window holds too few rows for a sound comparison."""
