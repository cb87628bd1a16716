"""Async models: the await is timed, errors and cancellations recorded, results sampled,
inside a real FastAPI app served by uvicorn."""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
import weakref
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from monitor import Monitor, schema, storage
from tests.api_server import serving

SLEEP_S = 0.2


def _aggregate(mon: Monitor, model: str) -> dict[str, Any]:
    """Calls, errors, the smallest latency and error types summed over every interval."""
    t = schema.LatencyAggregate
    with mon.db.session() as s:
        rows = s.scalars(select(t).where(t.model == model)).all()
        types: dict[str, int] = {}
        for r in rows:
            for name, n in r.error_types.items():
                types[name] = types.get(name, 0) + n
        return {
            "calls": sum(r.calls for r in rows), "errors": sum(r.errors for r in rows),
            "min_ms": min((r.min_ms for r in rows), default=None), "error_types": types,
        }  # fmt: skip


def _spans(mon: Monitor, model: str) -> list[tuple[str, float, str | None]]:
    t = schema.CallSpan
    with mon.db.session() as s:
        stmt = select(t.status, t.duration_ms, t.error_type).where(t.model == model)
        return [tuple(r) for r in s.execute(stmt)]  # type: ignore[misc]


def test_concurrent_requests_to_a_fastapi_app_record_the_awaits(db_url: str) -> None:
    async def predict(x: np.ndarray) -> np.ndarray:
        deadline = time.perf_counter() + SLEEP_S
        while (left := deadline - time.perf_counter()) > 0:  # asyncio may wake a bit early
            await asyncio.sleep(left)
        if x[0, 0] < 0:
            raise ValueError(f"negative input {x[0, 0]}")
        return 2 * x

    with Monitor(db_url, sample_rate=1.0, span_sample_rate=1.0) as mon:
        model = mon.wrap(predict, name="aio", version="v1")
        app = FastAPI()

        @app.get("/predict/{x}")
        async def route(x: float) -> dict[str, float]:
            return {"y": float((await model(np.array([[x]])))[0, 0])}

        async def send(base: str) -> list[int]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                replies = await asyncio.gather(
                    *(client.get(f"/predict/{x}") for x in [*range(12), -1, -2, -3])
                )
            assert [r.json()["y"] for r in replies[:12]] == [2.0 * x for x in range(12)]
            return [r.status_code for r in replies]

        with serving(app, lifespan="off") as base:
            codes = asyncio.run(send(base))
        assert codes == [200] * 12 + [500] * 3
        assert mon.flush()
        agg = _aggregate(mon, "aio")
        samples = storage.read_samples(mon.db, "aio")
        spans = _spans(mon, "aio")
    assert agg["calls"] == 15 and agg["errors"] == 3
    assert agg["min_ms"] >= SLEEP_S * 1000  # the await is timed, not the coroutine's creation
    assert len(spans) == 15 and min(ms for _, ms, _ in spans) >= SLEEP_S * 1000
    assert sorted(e for _, _, e in spans if e) == ["ValueError"] * 3
    assert sorted(s.outputs["value"] for s in samples if s.outputs) == [2.0 * x for x in range(12)]


def test_an_async_model_that_raises_reraises_the_same_exception(sqlite_url: str) -> None:
    boom = KeyError("no such user")

    async def model(x: Any) -> Any:
        await asyncio.sleep(0)
        raise boom

    with Monitor(sqlite_url) as mon:
        wrapped = mon.wrap(model, name="araise")
        with pytest.raises(KeyError) as info:
            asyncio.run(wrapped(1))
        assert info.value is boom
        assert mon.flush()
        agg = _aggregate(mon, "araise")
    assert agg["calls"] == 1 and agg["errors"] == 1 and agg["error_types"] == {"KeyError": 1}


def test_cancelling_an_awaited_call_records_it_as_cancelled_and_keeps_nothing(
    sqlite_url: str,
) -> None:
    started = asyncio.Event()

    async def slow(x: np.ndarray) -> np.ndarray:
        started.set()
        await asyncio.sleep(3600)
        return x

    async def cancel_one(model: Any, x: np.ndarray) -> None:
        task = asyncio.create_task(model(x))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        model = mon.wrap(slow, name="acancel")
        x = np.ones((2, 3))
        x_ref = weakref.ref(x)
        asyncio.run(cancel_one(model, x))
        del x
        assert mon.flush()
        spans = _spans(mon, "acancel")
        agg = _aggregate(mon, "acancel")
        stats = mon.stats()
        gc.collect()
        assert x_ref() is None  # no record, task or coroutine holds the input any more
    assert [status for status, _, _ in spans] == ["cancelled"]
    assert agg["calls"] == 0  # a cancelled await has no latency and is not an error
    assert stats["counters"]["cancelled"] == 1
    assert stats["queued"] == 0 and stats["pending_rows"] == 0


def test_instrument_and_async_callable_objects_stay_awaitable(sqlite_url: str) -> None:
    class Scorer:
        async def __call__(self, x: float) -> float:
            await asyncio.sleep(0)
            return x + 1

    with Monitor(sqlite_url, sample_rate=1.0) as mon:

        @mon.instrument(name="adeco")
        async def predict(x: float) -> float:
            await asyncio.sleep(0)
            return x * 3

        scorer = mon.wrap(Scorer(), name="aobj")
        assert inspect.iscoroutinefunction(predict) and predict.__name__ == "predict"

        async def both() -> tuple[float, float]:
            return await predict(2.0), await scorer(np.array([[2.0]]))

        assert asyncio.run(both()) == (6.0, 3.0)
        assert mon.flush()
        calls = [_aggregate(mon, m)["calls"] for m in ("adeco", "aobj")]
        (obj_sample,) = storage.read_samples(mon.db, "aobj")
    assert calls == [1, 1]
    assert obj_sample.outputs == {"value": 3.0}
