"""tunewatch control plane: registry, tuning, experiments, promotions, scheduler, CLI, API.

Heavy libraries (torch, onnxruntime, evidently, fastapi) load on first use.
"""

from __future__ import annotations

from tuner.errors import ArtifactError, Conflict, NotEnoughSamples, NotFound, TunerError
from tuner.registry import register, set_policy
from tuner.tuning import run_tuning

__all__ = [
    "ArtifactError",
    "Conflict",
    "NotEnoughSamples",
    "NotFound",
    "TunerError",
    "register",
    "run_tuning",
    "set_policy",
]
