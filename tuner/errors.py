"""The control plane's exceptions: one root, a few subclasses that also inherit a built-in."""

from __future__ import annotations


class TunerError(Exception):
    """Root of every error raised by :mod:`tuner`."""


class ArtifactError(TunerError, ValueError):
    """An artifact is missing, corrupted or does not match its recorded sha256."""


class NotEnoughSamples(TunerError, ValueError):
    """Too few production samples to calibrate or evaluate; the message says how many."""


class Conflict(TunerError, RuntimeError):
    """A state change lost a race (e.g. a promotion was already decided)."""


class NotFound(TunerError, KeyError):
    """A model, version, run, experiment or promotion does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
