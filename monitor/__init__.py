"""tunewatch data plane: wrap model calls, record telemetry, detect trouble, route traffic.

Only light modules load at ``import monitor``; heavy ones (evidently, torch, onnxruntime)
load on first use.
"""

from __future__ import annotations

from monitor.core import Monitor
from monitor.errors import (
    ConfigError,
    InsufficientData,
    MonitorError,
    NotFound,
    SchemaOutOfDate,
    StorageError,
)
from monitor.settings import Settings

__all__ = [
    "ConfigError",
    "InsufficientData",
    "Monitor",
    "MonitorError",
    "NotFound",
    "SchemaOutOfDate",
    "Settings",
    "StorageError",
]
