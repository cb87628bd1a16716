"""``await dep.acall(...)`` inside a real FastAPI app on a real uvicorn, with concurrent calls."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from monitor import Monitor, Settings
from monitor.storage import Database, read_aggregates
from tests.api_server import serving
from tests.serving_models import tiny_onnx
from tuner import registry

CONCURRENT = 16


def _register(url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(url)
    registry.register("m", tiny_onnx(tmp_path / "v1.onnx"), db=db, settings=settings)
    db.dispose()


def _app(dep: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/predict")
    async def predict(i: int) -> dict[str, Any]:
        x = np.full((1, 4), float(i), dtype=np.float32)
        (y,) = await dep.acall({"x": x}, key=str(i))
        return {"y": y.tolist()}

    return app


async def _concurrently(base: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return await asyncio.gather(*(client.get("/predict", params={"i": i}) for i in range(n)))


def _expected(i: int) -> list[list[float]]:
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    return (np.full((1, 4), float(i), dtype=np.float32) @ w).tolist()


def test_awaited_calls_are_batched_together_while_the_loop_stays_free(
    sqlite_url: str, tmp_path: Path
) -> None:
    _register(sqlite_url, tmp_path)
    with Monitor(sqlite_url, sample_rate=0.0) as mon:
        # A blocked event loop would hand the batcher one item at a time, each waiting 2 s.
        dep = mon.deployment("m", poll_s=60, batching=True, max_batch_size=CONCURRENT // 2,
                             max_delay_ms=2000)  # fmt: skip
        with serving(_app(dep)) as base:
            responses = asyncio.run(_concurrently(base, CONCURRENT))
        assert [r.status_code for r in responses] == [200] * CONCURRENT
        assert [r.json()["y"] for r in responses] == [_expected(i) for i in range(CONCURRENT)]
        stats = dep.batching_stats()["champion"]
        assert stats["items"] == CONCURRENT and stats["batches"] < CONCURRENT
        mon.flush()
        rows = read_aggregates(mon.db, "m", arm="champion")
    assert sum(r.calls for r in rows) == CONCURRENT


def test_unbatched_awaited_calls_answer_each_caller(sqlite_url: str, tmp_path: Path) -> None:
    _register(sqlite_url, tmp_path)
    with Monitor(sqlite_url, sample_rate=0.0) as mon:
        dep = mon.deployment("m", poll_s=60, batching=False)
        with serving(_app(dep)) as base:
            responses = asyncio.run(_concurrently(base, CONCURRENT))
        assert [r.json()["y"] for r in responses] == [_expected(i) for i in range(CONCURRENT)]
        assert dep.batching_stats() == {}
        mon.flush()
        rows = read_aggregates(mon.db, "m", arm="champion")
    assert sum(r.calls for r in rows) == CONCURRENT and sum(r.errors for r in rows) == 0


def test_a_cancelled_awaited_call_leaves_the_batch_and_never_runs(
    sqlite_url: str, tmp_path: Path
) -> None:
    import pytest

    _register(sqlite_url, tmp_path)
    with Monitor(sqlite_url, sample_rate=0.0) as mon:
        dep = mon.deployment("m", poll_s=60, batching=True, max_batch_size=8,
                             max_delay_ms=60_000)  # fmt: skip

        async def cancel_one() -> None:
            task = asyncio.ensure_future(dep.acall({"x": np.ones((1, 4), dtype=np.float32)}))
            await asyncio.sleep(0)  # the call reaches the batcher's queue and waits there
            assert dep.batching_stats()["champion"]["pending"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_one())
        dep.close()  # runs what is queued: the cancelled item is skipped
        stats = dep.batching_stats()["champion"]
    assert stats["items"] == 0 and stats["batches"] == 0 and stats["pending"] == 0
