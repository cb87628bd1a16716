"""Shared real resources for the API and web tests: a uvicorn server thread and seeded rows."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from monitor.settings import Settings
from monitor.storage import Database
from tests.serving_models import tiny_onnx
from tuner import promotions, registry
from tuner.api import create_app

TOKEN = "s3cret-test-token-0123456789"

EVIDENCE: dict[str, Any] = {
    "arms": {
        "champion": {"version": "v1", "calls": 1200, "errors": 3, "error_rate": 0.0025,
                     "p50_ms": 4.1, "p95_ms": 7.9, "p99_ms": 9.5},
        "challenger": {"version": "v2", "calls": 1180, "errors": 2, "error_rate": 0.0017,
                       "p50_ms": 2.3, "p95_ms": 4.4, "p99_ms": 5.6},
    },
    "latency": {"median_ratio": 0.561, "median_ci": [0.54, 0.58], "p95_ratio": 0.557,
                "p95_ci": [0.52, 0.6], "p_value": 1e-12, "reason": "challenger faster"},
    "error_rate": {"rate_a": 0.0025, "rate_b": 0.0017, "difference": -0.0008,
                   "p_value": 0.61, "ci": [-0.004, 0.0025], "decision": "no_difference"},
    "agreement": {"source": "shadow", "compared": 900, "agreed": 897, "rate": 0.9967},
    "timeline": [
        {"t": f"2026-11-28T18:{m:02d}:00+00:00", "arm": arm, "p50_ms": p50 + m / 100,
         "p95_ms": 2 * p50 + m / 50, "calls": 120}
        for m in range(0, 60, 10)
        for arm, p50 in (("champion", 4.0), ("challenger", 2.2))
    ],
    "decision": "challenger_better",
    "reason": "faster at p50 and p95, errors and outputs unchanged",
}  # fmt: skip


def without_auth(settings: Settings) -> Settings:
    """``settings`` with ``api_auth_disabled`` on."""
    return settings.replace(api_auth_disabled=True)


def seed_model(db: Database, settings: Settings, tmp: Path, name: str, versions: int = 2) -> None:
    """Register ``name`` with a champion v1 and candidates v2..vN from tiny ONNX files."""
    for i in range(1, versions + 1):
        onnx_path = tiny_onnx(tmp / f"{name}-v{i}.onnx", scale=float(i))
        registry.register(name, onnx_path, version=f"v{i}", db=db, settings=settings)


def request_promotion(db: Database, name: str, to_version: str = "v2") -> int:
    """Create a pending promotion of ``name`` to ``to_version`` with :data:`EVIDENCE`."""
    evidence = dict(EVIDENCE)
    evidence["arms"] = {
        "champion": EVIDENCE["arms"]["champion"],
        "challenger": {**EVIDENCE["arms"]["challenger"], "version": to_version},
    }
    return promotions.request(db, name, to_version, evidence=evidence).id


@contextlib.contextmanager
def running_api(settings: Settings, db: Database) -> Iterator[str]:
    """Serve the real app with uvicorn on a free 127.0.0.1 port; yield its base URL."""
    with serving(create_app(settings, db), lifespan="on") as url:
        yield url


@contextlib.contextmanager
def serving(app: Any, lifespan: str = "auto") -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on a free 127.0.0.1 port; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        for _ in range(600):  # up to 30 s on a busy machine
            if server.started or not thread.is_alive():
                break
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError("uvicorn did not start within 30 s")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
