"""A FastAPI app whose deployment is created at import: before the fork under ``--preload``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI

from monitor import Monitor

mon = Monitor(sample_rate=0.0, span_sample_rate=0.0)
dep = mon.deployment("m", poll_s=float(os.environ.get("PREFORK_POLL_S", "0.3")))


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    # uvicorn re-raises SIGTERM with the default action after shutdown, which skips atexit:
    # closing here writes what the last flush interval recorded.
    mon.close()


app = FastAPI(lifespan=lifespan)


def _feed(i: int) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), float(i % 7 + 1), dtype=np.float32)}


@app.get("/healthz")
def healthz() -> dict[str, int]:
    """Not a model call: nothing is recorded."""
    return {"pid": os.getpid()}


@app.get("/predict")
def predict(i: int = 1) -> dict[str, object]:
    """A blocking call (FastAPI runs it in its thread pool)."""
    (y,) = dep(_feed(i), key=str(i))
    return {"pid": os.getpid(), "y": y.tolist()}


@app.get("/apredict")
async def apredict(i: int = 1) -> dict[str, object]:
    """An awaited call: the event loop stays free while the model runs."""
    (y,) = await dep.acall(_feed(i), key=str(i))
    return {"pid": os.getpid(), "y": y.tolist()}
