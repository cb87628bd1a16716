"""``Monitor``: wrap model calls and log batches; everything else happens off the call path."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import inspect
import logging
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from random import random
from time import perf_counter_ns
from typing import Any, TypeVar

import numpy as np

from monitor.errors import ConfigError, SchemaOutOfDate, StorageError
from monitor.features import OUTPUT_KINDS, named_inputs, sample_rows, snapshot
from monitor.labels import REQUEST, check_ids, request_context
from monitor.settings import Settings
from monitor.storage import Database, ensure_schema, redact
from monitor.telemetry import build_meter_provider, build_tracer_provider, current_parent, emit_span
from monitor.writer import CANCELLED, CAPPED, DROP_PREFIX, Key, LogBatch, Writer

log = logging.getLogger("tunewatch")
F = TypeVar("F", bound=Callable[..., Any])


def batch_size_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """First dimension of the first array-like input, else 1."""
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, Mapping):
        x = next(iter(x.values()), None)
    shape = getattr(x, "shape", None)
    if shape:
        return int(shape[0])
    if isinstance(x, (list, tuple)):
        return len(x)
    return 1


class Monitor:
    """Instrument model calls; telemetry goes to SQLite by default or PostgreSQL.

    >>> mon = Monitor("sqlite://")          # in-memory database, for the example
    >>> double = mon.wrap(lambda x: 2 * x, name="double", version="v1")
    >>> double(21)
    42
    >>> mon.close()
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        span_exporters: Iterable[Any] = (),
        metric_readers: Iterable[Any] = (),
        **overrides: Any,
    ) -> None:
        base = settings or Settings.load()
        if database_url is not None:
            overrides["database_url"] = database_url
        self.settings = base.replace(**overrides) if overrides else base
        self.instance_id = uuid.uuid4().hex[:16]
        self.db = Database(self.settings.database_url, check_schema=False)
        schema_ok = self._check_schema()
        self._tracer_provider = build_tracer_provider(_SpanSink(self), span_exporters)
        self._tracer = self._tracer_provider.get_tracer("tunewatch")
        self._writer = Writer(
            self.db, self.settings, instance_id=self.instance_id, schema_ok=schema_ok,
            make_span=self._make_span,
        )  # fmt: skip
        self._meter_provider = build_meter_provider(self._observe, metric_readers)
        self._keys: dict[tuple[str, str, str], Key] = {}
        self._deployments: list[Any] = []
        self._closed = False
        _LIVE.add(self)

    def _check_schema(self) -> bool:
        try:
            ensure_schema(self.db.engine)
            return True
        except SchemaOutOfDate:
            raise
        except StorageError as exc:
            log.warning(
                "tunewatch: database %s unreachable (%s); buffering telemetry until it is back",
                redact(self.settings.database_url), str(exc).splitlines()[-1][:200],
            )  # fmt: skip
            return False

    # --- wrapping -----------------------------------------------------------------------

    def key(self, name: str, version: str, arm: str | None = None, **extra: Any) -> Key:
        """The record key of a model version and arm (created once, reused)."""
        if not name or not isinstance(name, str):
            raise ConfigError(f"model name {name!r} must be a non-empty string")
        arm = arm or self.settings.default_arm
        ident = (name, str(version), arm)
        k = self._keys.get(ident)
        if k is None:
            output_kind = extra.get("output_kind", "auto")
            if output_kind not in OUTPUT_KINDS:
                raise ConfigError(f"output_kind={output_kind!r} is not one of {OUTPUT_KINDS}")
            names = extra.get("feature_names")
            k = Key(name, str(version), arm, extra.get("kind", "callable"), output_kind,
                    tuple(names) if names is not None else None)  # fmt: skip
            self._keys[ident] = k
        return k

    def wrap(
        self,
        model: Any,
        *,
        name: str,
        version: str = "v1",
        arm: str | None = None,
        output_kind: str = "auto",
        feature_names: Sequence[str] | None = None,
    ) -> Any:
        """Return ``model`` instrumented: same call, same results, same exceptions.

        Accepts any callable, a ``torch.nn.Module`` (run under ``torch.inference_mode()``),
        or an ``onnxruntime.InferenceSession`` (``run(output_names, feed)`` or ``(feed)``).
        An ``async def`` function, or an object whose ``__call__`` is one, gets an async
        wrapper (``await model(x)``) that times the await and samples the awaited result.

        Raises:
            TypeError: ``model`` is not callable and not an InferenceSession.
        """
        kind = _model_kind(model)
        key = self.key(name, version, arm, kind=kind, output_kind=output_kind,
                       feature_names=feature_names)  # fmt: skip
        if kind == "onnx":
            return InstrumentedSession(self, model, key)
        if kind == "torch":
            return InstrumentedModule(self, model, key)
        if _is_async(model):
            return AsyncInstrumented(self, model, key)
        return Instrumented(self, model, key)

    def instrument(
        self, *, name: str, version: str = "v1", arm: str | None = None
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`wrap` for functions (``async def`` ones included)."""

        def decorate(fn: F) -> F:
            wrapped = self.wrap(fn, name=name, version=version, arm=arm)
            if isinstance(wrapped, AsyncInstrumented):
                ainvoke = wrapped._ainvoke

                @functools.wraps(fn)
                async def awrapper(*args: Any, **kwargs: Any) -> Any:
                    return await ainvoke(fn, args, kwargs)

                return awrapper  # type: ignore[return-value]
            invoke = wrapped._invoke

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return invoke(fn, args, kwargs)

            return wrapper  # type: ignore[return-value]

        return decorate

    def deployment(self, name: str, **options: Any) -> Any:
        """Serve ``name``'s champion from the registry, routing a share to a challenger.

        Options: ``poll_s`` (routing reload period, default 5 s), ``batching`` (default: on
        when the tuner chose a batch size > 1), ``max_batch_size``, ``max_delay_ms``,
        ``batch_workers`` (batches run at once; default the version's ``batch_workers``, else 1).
        See :class:`monitor.deploy.Deployment`.

        Raises:
            NotFound: the model has no champion in the registry.
        """
        from monitor.deploy import Deployment

        dep = Deployment(self, name, **options)
        self._deployments.append(dep)
        return dep

    # --- explicit logging ---------------------------------------------------------------

    def log(
        self,
        *,
        name: str,
        version: str = "v1",
        inputs: Any,
        outputs: Any = None,
        latency_ms: float | Sequence[float] | np.ndarray | None = None,
        timestamps: Any = None,
        arm: str | None = None,
        ids: Any = None,
    ) -> int:
        """Log a batch of inputs (and outputs, latencies) now or backfilled at ``timestamps``.

        Every row is stored (no sampling). ``ids`` (one per row) are what labels logged later
        join on (:meth:`log_labels`). Returns the number of rows accepted.

        Raises:
            ValueError: lengths of ``outputs``, ``latency_ms``, ``timestamps`` or ``ids`` do
                not match the rows of ``inputs``, or an id is not a string or integer.
        """
        key = self.key(name, version, arm)
        feed = inputs if isinstance(inputs, Mapping) else {"arg0": inputs}
        rows = sample_rows(
            named_inputs((feed,), {}), outputs, max_rows=1 << 62,
            tabular_max_columns=self.settings.tabular_max_columns,
            raw_row_max_bytes=self.settings.raw_row_max_bytes
            if self.settings.raw_reservoir_mb > 0 else 0,  # no reservoir: no raw rows, as calls
            output_kind=key.output_kind, feature_names=key.feature_names,
        )  # fmt: skip
        n = len(rows)
        if n == 0:
            raise ValueError(f"inputs of type {type(inputs).__name__} hold no rows to log")
        times = _timestamps(timestamps, n)
        lat = _latencies(latency_ms, n)
        row_ids = check_ids(ids, n) if ids is not None else None
        self._writer.logs.append(LogBatch(key, times, rows, lat, row_ids))
        self._writer._wake.set()
        return n

    def context(self, request_id: Any = None, *, sample: bool = False) -> Any:
        """``with mon.context(request_id=..., sample=True):`` ids the monitored calls inside.

        Sampled rows of those calls (wrapped models and deployments) store the id, so labels
        logged later join to them. ``sample=True`` keeps every such call (the per-minute cap
        does not apply), so every request that will get a label can be joined. A sequence
        gives one id per row of a batched call. See :func:`monitor.labels.request_context`.
        """
        return request_context(request_id, sample=sample)

    def log_labels(
        self, *, name: str, ids: Any, labels: Any, timestamps: Any = None, task: str = "auto"
    ) -> Any:
        """Store labels (class indices or targets) for the predictions with ``ids``.

        Pending telemetry is written first, so predictions made just before join. Returns a
        :class:`monitor.labels.LabelReport`: how many joined, were not sampled (unknown id),
        duplicated an earlier label (the last one wins) or were missing (NaN).

        Raises:
            ConfigError: a label of the wrong type or shape (the message names it and its id).
        """
        from monitor.labels import log_labels

        self.flush(timeout=10.0)
        return log_labels(self.db, name, ids, labels, timestamps, task=task)

    # --- lifecycle ----------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything recorded so far; True once it is in the database."""
        self._tracer_provider.force_flush()
        return self._writer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the background writer (also runs at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        for dep in self._deployments:
            dep.close()
        self._tracer_provider.force_flush()
        self._writer.close(timeout)
        self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
        self.db.dispose()
        _LIVE.discard(self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def dropped(self) -> int:
        """Telemetry records dropped by this process (queue or buffer full)."""
        return self._writer.dropped

    def stats(self) -> dict[str, Any]:
        """This process's counters: queued calls, pending rows, drops by reason."""
        w = self._writer
        return {
            "queued": len(w.calls),
            "pending_rows": w.pending_rows,
            "dropped": w.dropped,
            "counters": dict(w.counters),
        }

    # --- internals ----------------------------------------------------------------------

    def _drop(self) -> None:
        self._writer.count(DROP_PREFIX + "queue_full")

    def _internal_error(self) -> None:
        """A record that could not be built (e.g. an odd input): counted, never raised."""
        with contextlib.suppress(Exception):
            self._writer.count(DROP_PREFIX + "internal_error")

    def _make_span(
        self, key: Key, wall_ns: int, dt_ns: int, error: str | None, parent: Any, items: int
    ) -> None:
        attrs = {
            "tunewatch.model": key.model, "tunewatch.version": key.version,
            "tunewatch.arm": key.arm, "tunewatch.batch_size": items,
        }  # fmt: skip
        emit_span(self._tracer, parent if parent is not True else None, attrs, wall_ns, dt_ns,
                  error)  # fmt: skip

    def _observe(self) -> tuple[list[Any], list[Any], dict[str, int]]:
        w = self._writer
        calls, errors = [], []
        for key, (n, e) in list(w.totals.items()):
            attrs = {"model": key.model, "version": key.version, "arm": key.arm}
            calls.append((attrs, n))
            errors.append((attrs, e))
        drops = {
            k[len(DROP_PREFIX) :]: v for k, v in w.counters.items() if k.startswith(DROP_PREFIX)
        }
        return calls, errors, drops


class _SpanSink:
    """Lazily bound view of the writer's span queue (the provider is built before the writer)."""

    def __init__(self, mon: Monitor) -> None:
        self._mon = mon

    def append(self, row: dict[str, Any]) -> None:
        self._mon._writer.span_rows.append(row)


class Instrumented:
    """A wrapped callable. The call path: two clock reads, one random draw, one append."""

    __slots__ = ("__weakref__", "_fn", "_key", "_mon", "_q", "_qmax", "_rows", "_srate", "_trate")

    def __init__(self, mon: Monitor, fn: Any, key: Key) -> None:
        if not callable(fn):
            raise TypeError(
                f"cannot wrap an object of type {type(fn).__name__}: pass a callable, a "
                "torch.nn.Module or an onnxruntime.InferenceSession"
            )
        self._fn = fn
        self._key = key
        self._mon = mon
        self._q = mon._writer.calls
        self._qmax = mon.settings.queue_size
        self._srate = mon.settings.sample_rate
        self._trate = mon.settings.span_sample_rate
        self._rows = max(1, mon.settings.sample_cap_per_minute)  # most rows one call can store

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(self._fn, args, kwargs)

    def _invoke(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        t0 = perf_counter_ns()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._record(t0, perf_counter_ns() - t0, args, kwargs, None, type(exc).__name__)
            raise
        self._record(t0, perf_counter_ns() - t0, args, kwargs, result, None)
        return result

    def _record(
        self, t0: int, dt: int, args: Any, kwargs: Any, result: Any, error: str | None
    ) -> None:
        """Queue one call (the only monitoring work on the call path); never raises."""
        try:
            q = self._q
            if len(q) >= self._qmax:
                self._mon._drop()
                return
            r = random()
            ctx = _request()  # None unless the caller set mon.context(...)
            payload = None
            if error is None and (r < self._srate or (ctx is not None and ctx.sample)):
                w = self._mon._writer
                # This minute's cap already spent: say so, copy nothing (a forced sample is
                # kept beyond the cap).
                if (ctx is None or not ctx.sample) and w.spent.get(self._key) == (
                    t0 + w._wall_offset_ns
                ) // 60_000_000_000:
                    payload = CAPPED
                else:
                    payload = self._snapshot(args, kwargs, result, ctx)
            q.append((
                self._key, t0, dt, batch_size_of(args, kwargs), error, payload,
                (current_parent() or True) if r < self._trate else None,
            ))  # fmt: skip
        except Exception:  # monitoring never raises into the caller
            self._mon._internal_error()

    def _snapshot(self, args: Any, kwargs: Any, result: Any, ctx: Any = None) -> Any:
        """Copy what a sampled call stores, so a reused buffer cannot change it later; with
        the request id and whether the context forced the sample."""
        try:
            # A forced sample keeps the whole call; otherwise no more rows than can be stored.
            k = self._rows if ctx is None or not ctx.sample else 1 << 62
            return (
                tuple(snapshot(a, k) for a in args),
                {name: snapshot(v, k) for name, v in kwargs.items()},
                snapshot(result, k),
                ctx.request_id if ctx is not None else None,
                ctx is not None and ctx.sample,
            )
        except Exception:  # an input that cannot be copied loses only its sample
            self._mon._internal_error()
            return None

    def _record_cancelled(self, t0: int, dt: int, args: Any, kwargs: Any) -> None:
        """Queue a cancelled await: never sampled, always traced (cancellations are rare)."""
        try:
            if len(self._q) >= self._qmax:
                self._mon._drop()
                return
            self._q.append((self._key, t0, dt, batch_size_of(args, kwargs), CANCELLED, None,
                            current_parent() or True))  # fmt: skip
        except Exception:  # monitoring never raises into the caller
            self._mon._internal_error()

    @property
    def __wrapped__(self) -> Any:
        return self._fn

    def __getattr__(self, item: str) -> Any:
        return getattr(self._fn, item)

    def __repr__(self) -> str:
        return f"<tunewatch {self._key.model}:{self._key.version} wrapping {self._fn!r}>"


class AsyncInstrumented(Instrumented):
    """A wrapped ``async def`` model: ``await model(x)`` is timed and sampled when it ends.

    An exception raised inside the await is recorded as an error and re-raised as is; a
    cancelled await is recorded as ``cancelled`` (a span with that status, no latency).
    """

    __slots__ = ()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self._ainvoke(self._fn, args, kwargs)

    async def _ainvoke(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        t0 = perf_counter_ns()
        try:
            result = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            self._record_cancelled(t0, perf_counter_ns() - t0, args, kwargs)
            raise
        except BaseException as exc:
            self._record(t0, perf_counter_ns() - t0, args, kwargs, None, type(exc).__name__)
            raise
        self._record(t0, perf_counter_ns() - t0, args, kwargs, result, None)
        return result


# torch.nn.Module methods that return the module itself: they return the wrapper instead.
_RETURNS_MODULE = frozenset({
    "eval", "train", "to", "cpu", "cuda", "half", "float", "double", "bfloat16",
    "requires_grad_", "share_memory", "apply", "to_empty", "xpu", "type",
})  # fmt: skip


class InstrumentedModule(Instrumented):
    """A wrapped ``torch.nn.Module``, called under ``torch.inference_mode()``.

    ``eval()``, ``to(...)`` and the other methods that return the module return the wrapper,
    so ``mon.wrap(net).eval()`` stays instrumented.
    """

    __slots__ = ("_inference_mode",)

    def __init__(self, mon: Monitor, module: Any, key: Key) -> None:
        import torch

        super().__init__(mon, module, key)
        self._inference_mode = torch.inference_mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._inference_mode():
            return self._invoke(self._fn, args, kwargs)

    def __getattr__(self, item: str) -> Any:
        attr = getattr(self._fn, item)
        if item not in _RETURNS_MODULE or not callable(attr):
            return attr

        @functools.wraps(attr)
        def returning_wrapper(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            return self if out is self._fn else out

        return returning_wrapper


class InstrumentedSession(Instrumented):
    """A wrapped ``onnxruntime.InferenceSession``: ``run(names, feed)`` or ``(feed)``."""

    __slots__ = ("_sess",)

    def __init__(self, mon: Monitor, session: Any, key: Key) -> None:
        super().__init__(mon, session.run, key)
        self._sess = session

    def run(self, output_names: Any, input_feed: Mapping[str, Any], run_options: Any = None) -> Any:
        """``InferenceSession.run`` with the call recorded; the feed is sampled by name."""
        t0 = perf_counter_ns()
        try:
            result = self._fn(output_names, input_feed, run_options)
        except BaseException as exc:
            self._record(t0, perf_counter_ns() - t0, (input_feed,), {}, None, type(exc).__name__)
            raise
        self._record(t0, perf_counter_ns() - t0, (input_feed,), {}, result, None)
        return result

    def __call__(self, input_feed: Mapping[str, Any], output_names: Any = None) -> Any:
        return self.run(output_names, input_feed)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._sess, item)


def _model_kind(model: Any) -> str:
    cls_names = {c.__module__.split(".")[0] + "." + c.__name__ for c in type(model).__mro__}
    if "onnxruntime.InferenceSession" in cls_names:
        return "onnx"
    if "torch.Module" in cls_names:
        return "torch"
    if not callable(model):
        raise TypeError(
            f"cannot wrap an object of type {type(model).__name__}: pass a callable, a "
            "torch.nn.Module or an onnxruntime.InferenceSession"
        )
    return "callable"


def _is_async(model: Any) -> bool:
    """An ``async def`` function (or partial of one), or an object with an async ``__call__``."""
    if inspect.iscoroutinefunction(model):
        return True
    return callable(model) and inspect.iscoroutinefunction(type(model).__call__)


def _timestamps(value: Any, n: int) -> list[datetime]:
    if value is None:
        return [datetime.now(timezone.utc)] * n
    if isinstance(value, (datetime, str, int, float, np.datetime64)):
        return [_one_time(value)] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(
            f"timestamps has {len(values)} entries but inputs has {n} rows: pass one per row"
        )
    return [_one_time(v) for v in values]


def _one_time(v: Any) -> datetime:
    if isinstance(v, np.datetime64):
        v = v.astype("datetime64[us]").item()
    if hasattr(v, "to_pydatetime"):
        v = v.to_pydatetime()
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(
                f"timestamp {v!r} is not ISO-8601 (e.g. 2026-01-31T12:00:00Z)"
            ) from None
    if isinstance(v, (int, float)):
        return datetime.fromtimestamp(float(v), timezone.utc)
    if isinstance(v, datetime):
        return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)
    raise ValueError(f"timestamp {v!r} of type {type(v).__name__} is not a datetime or epoch")


def _latencies(value: Any, n: int) -> list[float] | None:
    if value is None:
        return None
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, n)
    if arr.size != n:
        raise ValueError(f"latency_ms has {arr.size} values but inputs has {n} rows")
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        raise ValueError("latency_ms must be finite and >= 0 milliseconds")
    return [float(x) for x in arr]


_LIVE: weakref.WeakSet[Monitor] = weakref.WeakSet()
_request = REQUEST.get  # bound once: the call path's whole cost when no context is set


@atexit.register
def _close_all() -> None:
    for mon in list(_LIVE):
        with contextlib.suppress(Exception):  # exiting: nothing left to tell
            mon.close(timeout=5.0)


__all__ = [
    "AsyncInstrumented", "Instrumented", "InstrumentedModule", "InstrumentedSession", "Monitor",
]  # fmt: skip
