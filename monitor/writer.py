"""The background writer: drains the call queue, aggregates, and writes batches to the database.

The hot path only appends a tuple to a bounded deque. This thread turns those tuples into
per-interval latency histograms, OpenTelemetry spans and input/output samples, and writes them
in one transaction per flush. While the database is down it keeps what it can (up to
``buffer_rows`` rows) and retries with exponential backoff; what does not fit is counted as a
drop, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy.dialects import postgresql, sqlite

from monitor import schema, sketch
from monitor.errors import MonitorError, SchemaOutOfDate, StorageError
from monitor.features import RowSample, named_inputs, sample_rows
from monitor.labels import row_ids
from monitor.settings import Settings
from monitor.storage import Database, ensure_schema, insert_rows
from monitor.telemetry import CANCELLED, CAPPED

log = logging.getLogger("tunewatch.writer")

DROP_PREFIX = "dropped_"
# Sampled records waiting for conversion; beyond this the oldest sample is dropped (counted).
EXTRAS_BACKLOG = 10_000
RAW_CLEAR_BATCH = 200  # raw rows cleared per statement when a version's reservoir is full
RAW_CLEAR_BATCHES = 10  # statements per flush at most, so the writer never stalls on it
RAW_RESYNC_S = 300.0  # re-read a version's raw total from the database at most this often


@dataclass(eq=False)
class Key:
    """What a wrapped model records under; compared by identity on the hot path."""

    model: str
    version: str
    arm: str
    kind: str = "callable"
    output_kind: str = "auto"
    feature_names: tuple[str, ...] | None = None


@dataclass
class Agg:
    """One interval's latency histogram for one key (cumulative until the interval closes)."""

    calls: int = 0
    errors: int = 0
    items: int = 0
    sum_ms: float = 0.0
    min_ms: float = float("inf")
    max_ms: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)
    dirty: bool = True

    def add(self, ms: float, items: int, error: str | None) -> None:
        self.calls += 1
        self.items += items
        self.sum_ms += ms
        self.min_ms = min(self.min_ms, ms)
        self.max_ms = max(self.max_ms, ms)
        b = sketch.bucket_of(ms)
        self.buckets[b] = self.buckets.get(b, 0) + 1
        if error is not None:
            self.errors += 1
            self.error_types[error] = self.error_types.get(error, 0) + 1
        self.dirty = True

    def add_many(self, dt_ns: list[int], items: int, errors: list[str]) -> None:
        """Add many calls at once (vectorised: the writer's hot loop)."""
        ms = np.asarray(dt_ns, dtype=np.float64) / 1e6
        self.calls += len(dt_ns)
        self.items += items
        self.sum_ms += float(ms.sum())
        self.min_ms = min(self.min_ms, float(ms.min()))
        self.max_ms = max(self.max_ms, float(ms.max()))
        idx, counts = np.unique(sketch.buckets_of(ms), return_counts=True)
        for b, c in zip(idx.tolist(), counts.tolist()):
            self.buckets[b] = self.buckets.get(b, 0) + c
        for error in errors:
            self.errors += 1
            self.error_types[error] = self.error_types.get(error, 0) + 1
        self.dirty = True


@dataclass(frozen=True)
class LogBatch:
    """Rows handed over by ``Monitor.log``: samples and, optionally, per-call latencies."""

    key: Key
    times: list[datetime]
    rows: list[RowSample]
    latencies_ms: list[float] | None
    ids: list[str] | None = None  # one request id per row (``Monitor.log(ids=...)``)


class Writer:
    """Owns the queue, the pending rows and the thread that writes them."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        instance_id: str,
        schema_ok: bool,
        make_span: Callable[[Key, int, int, str | None, Any, int], None] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.instance_id = instance_id
        self.calls: deque[tuple[Any, ...]] = deque()
        self.logs: deque[LogBatch] = deque()
        self.span_rows: deque[dict[str, Any]] = deque()
        self.make_span = make_span
        self._schema_ok = schema_ok
        self._aggs: dict[tuple[Key, int, str], Agg] = {}
        self._log_batches = 0
        self._samples: list[dict[str, Any]] = []
        self._extras: deque[tuple[Any, ...]] = deque()  # sampled/traced calls to convert
        # Raw bytes stored per (model, version), re-read at most every RAW_RESYNC_S, and the
        # timestamp below which that version has no raw rows left (where clearing resumes).
        self._raw_used: dict[tuple[str, str], int] = {}
        self._raw_synced: dict[tuple[str, str], float] = {}
        self._raw_floor: dict[tuple[str, str], datetime] = {}
        self._spans: list[dict[str, Any]] = []
        self._seen: dict[Key, list[datetime]] = {}
        self._seen_dirty: set[Key] = set()
        self.counters: dict[str, int] = {}
        self.totals: dict[Key, list[int]] = {}  # calls and errors per key, for metrics
        # Shadow comparisons per (experiment, interval): compared, agreed, score, errors, ms.
        self._shadow: dict[tuple[int, int], list[float]] = {}
        self._shadow_dirty: set[tuple[int, int]] = set()
        self._drop_lock = threading.Lock()
        self._minute: dict[Key, tuple[int, int]] = {}
        # The minute (wall_ns // 60e9) whose sample cap a key has spent: the call path reads it
        # and sends CAPPED instead of copying rows the writer would drop.
        self.spent: dict[Key, int] = {}
        # Wall clock of the monotonic clock's zero, so the hot path needs one clock read.
        self._wall_offset_ns = time.time_ns() - time.perf_counter_ns()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._flush_seq = 0
        self._done_seq = 0
        self._stop = False
        self._backoff = 0.0
        self._last_error = ""
        self._start_thread()
        _LIVE.add(self)

    def _start_thread(self) -> None:
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="tunewatch-writer", daemon=True)
        self._thread.start()

    def _ensure_started(self) -> None:
        """In a process forked without the at-fork hook having run: start over lazily."""
        if self._pid != os.getpid():
            self._after_fork()

    def _after_fork(self) -> None:
        """In a forked child (e.g. a pre-forking server): fresh locks, connections, thread."""
        self._pid = os.getpid()
        self._drop_lock = threading.Lock()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._flush_seq = self._done_seq = 0
        self.instance_id = f"{self.instance_id[:8]}{os.getpid():08x}"[:16]
        # Everything pending is the parent's to write: the child starts empty.
        self.counters, self.totals, self._minute, self.spent = {}, {}, {}, {}
        self._shadow, self._shadow_dirty = {}, set()
        self._samples, self._spans = [], []
        self._extras.clear()
        self._raw_used, self._raw_synced = {}, {}
        self._seen_dirty.clear()
        self._aggs.clear()
        self.calls.clear()
        self.logs.clear()
        self.span_rows.clear()
        self.db.engine.dispose(close=False)  # never share the parent's connections
        if not self._stop:
            self._start_thread()

    # --- called from other threads ------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a counter (thread-safe)."""
        with self._drop_lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything queued so far; True when it reached the database in time."""
        self._ensure_started()
        with self._flushed:
            self._flush_seq += 1
            target = self._flush_seq
            self._wake.set()
            return self._flushed.wait_for(lambda: self._done_seq >= target, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the thread."""
        if self._stop:
            return
        self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def shadow(
        self, experiment_id: int, agreed: bool, score: float, error: bool, ms: float
    ) -> None:
        """Record one shadow comparison of a challenger with the champion (thread-safe)."""
        now = int(time.time())
        slot = (experiment_id, now - now % int(self.settings.aggregate_interval_s))
        with self._drop_lock:
            acc = self._shadow.setdefault(slot, [0, 0, 0.0, 0, 0.0])
            acc[0] += 1
            acc[1] += int(agreed)
            acc[2] += score
            acc[3] += int(error)
            acc[4] += ms
            self._shadow_dirty.add(slot)

    @property
    def dropped(self) -> int:
        """Records dropped so far, all reasons."""
        return sum(v for k, v in self.counters.items() if k.startswith(DROP_PREFIX))

    @property
    def pending_rows(self) -> int:
        """Rows waiting for the database."""
        return len(self._samples) + len(self._spans) + len(self.calls) + len(self._extras)

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.settings.flush_interval_s
        next_flush = time.monotonic() + interval
        while True:
            self._wake.wait(timeout=min(0.05, interval))
            self._wake.clear()
            with self._flushed:
                requested = self._flush_seq  # read first: everything queued before it is drained
            flushing = requested > self._done_seq or self._stop
            try:
                self._drain()
                # Converting samples is the writer's costly work: within a budget per loop,
                # so a huge sampled input never holds back the periodic flush; an explicit
                # flush converts everything queued before it.
                self._convert_extras(None if flushing else time.monotonic() + interval / 4)
            except Exception:  # never let a bad record kill the writer
                log.exception("tunewatch writer failed to process records")
                self.count("internal_errors")
            now = time.monotonic()
            if flushing or now >= next_flush:
                if self._flush_once():
                    with self._flushed:
                        self._done_seq = requested
                        self._flushed.notify_all()
                next_flush = time.monotonic() + max(interval, self._backoff)
            if self._stop and not self.calls and not self.logs and not self._extras:
                return

    def _drain(self) -> None:
        calls, pop = self.calls, self.calls.popleft
        aggs, step_ns = self._aggs, int(self.settings.aggregate_interval_s * 1e9)
        offset = self._wall_offset_ns
        # Group per (key, interval) in plain Python, then bucket each group with numpy.
        groups: dict[tuple[Key, int, str], tuple[list[int], list[int], list[str]]] = {}
        for _ in range(len(calls)):
            key, t0, dt, items, error, payload, span_ctx = pop()
            wall = t0 + offset
            slot = (key, wall - wall % step_ns, "")
            group = groups.get(slot)
            if group is None:
                group = groups[slot] = ([], [], [])
            if error is CANCELLED:  # not a finished call: no latency, never an error
                self.count(CANCELLED)
            else:
                group[0].append(dt)
                group[1].append(items)
                if error is not None:
                    group[2].append(error)
            if payload is CAPPED:  # sampled, but the minute's cap was already spent
                self.count("samples_capped")
                payload = None
            if payload is not None or span_ctx is not None:
                self._defer(key, wall, dt, items, error, payload, span_ctx)
        for slot, (dts, items_list, errors) in groups.items():
            if not dts:
                continue
            agg = aggs.get(slot)
            if agg is None:
                agg = aggs[slot] = Agg()
                self._mark_seen(slot[0], slot[1])
            agg.add_many(dts, sum(items_list), errors)
            total = self.totals.setdefault(slot[0], [0, 0])
            total[0] += len(dts)
            total[1] += len(errors)
        while self.logs:
            self._take_log(self.logs.popleft())
        while self.span_rows:
            self._buffer(self._spans, self.span_rows.popleft())

    def _defer(self, *record: Any) -> None:
        """Queue a sampled or traced call for conversion; a full backlog drops the oldest."""
        if len(self._extras) >= EXTRAS_BACKLOG:
            self._extras.popleft()
            self.count(DROP_PREFIX + "sample_backlog")
        self._extras.append(record)

    def _convert_extras(self, deadline: float | None) -> None:
        """Turn deferred calls into sample and span rows until ``deadline`` (None: all)."""
        extras, convert = self._extras, self._extras_of
        while extras:
            convert(*extras.popleft())
            if deadline is not None and time.monotonic() >= deadline:
                break
        while self.span_rows:  # the spans just built
            self._buffer(self._spans, self.span_rows.popleft())

    def _extras_of(
        self, key: Key, wall: int, dt: int, items: int, error: str | None, payload: Any,
        span_ctx: Any,
    ) -> None:  # fmt: skip
        """Sample and span of one call; a record that breaks them loses only them."""
        try:
            if payload is not None:
                self._sample(key, wall, payload, items)
            if span_ctx is not None and self.make_span is not None:
                self.make_span(key, wall, dt, error, span_ctx, items)
        except Exception:
            log.debug("tunewatch: cannot sample a call of %s", key.model, exc_info=True)
            self.count(DROP_PREFIX + "internal_error")

    def _mark_seen(self, key: Key, wall_ns: int) -> None:
        when = datetime.fromtimestamp(wall_ns / 1e9, timezone.utc)
        span = self._seen.get(key)
        if span is None:
            self._seen[key] = [when, when]
        else:
            span[0], span[1] = min(span[0], when), max(span[1], when)
        self._seen_dirty.add(key)

    def _sample(self, key: Key, wall_ns: int, payload: tuple[Any, ...], items: int = 1) -> None:
        minute = wall_ns // 60_000_000_000
        cur, used = self._minute.get(key, (minute, 0))
        if cur != minute:
            used = 0
        args, kwargs, result, request_id, forced = payload
        # A sample the caller forced (mon.context(sample=True)) is kept beyond the cap.
        room = self.settings.sample_cap_per_minute - used
        if forced:
            room = max(room, items, 1)
        if room <= 0:
            self.count("samples_capped")
            self.spent[key] = minute
            return
        raw_max = self.settings.raw_row_max_bytes if self.settings.raw_reservoir_mb > 0 else 0
        rows = sample_rows(
            named_inputs(args, kwargs), result, max_rows=room,
            tabular_max_columns=self.settings.tabular_max_columns, raw_row_max_bytes=raw_max,
            output_kind=key.output_kind, feature_names=key.feature_names,
        )  # fmt: skip
        self._minute[key] = (minute, used + len(rows))
        if used + len(rows) >= self.settings.sample_cap_per_minute:
            self.spent[key] = minute
        ts = datetime.fromtimestamp(wall_ns / 1e9, timezone.utc)
        # Ids of the stored rows only: a 6.5M-row call must not build 6.5M ids.
        ids = row_ids(request_id, max(items, len(rows)), first=len(rows))
        for r, rid in zip(rows, ids):
            self._buffer(self._samples, _sample_dict(key, ts, r, "call", rid))

    def _take_log(self, batch: LogBatch) -> None:
        key, ids = batch.key, batch.ids
        for i, r in enumerate(batch.rows):
            rid = ids[i] if ids is not None else None
            self._buffer(self._samples, _sample_dict(key, batch.times[i], r, "log", rid))
        for ts in (batch.times[0], batch.times[-1]):
            self._mark_seen(key, int(ts.timestamp() * 1e9))
        if batch.latencies_ms is None:
            return
        step = self.settings.aggregate_interval_s
        # Each backfill writes rows of its own, so it never overwrites an earlier one.
        self._log_batches += 1
        suffix = f":log{self._log_batches}"
        for ts, ms in zip(batch.times, batch.latencies_ms):
            epoch = int(ts.timestamp())
            slot = (key, (epoch - epoch % step) * 1_000_000_000, suffix)
            self._aggs.setdefault(slot, Agg()).add(ms, 1, None)
            self._buffer(self._spans, _log_span(key, ts, ms))

    def _buffer(self, rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
        if len(self._samples) + len(self._spans) >= self.settings.buffer_rows:
            self.count(DROP_PREFIX + "buffer_full")
            return
        rows.append(row)

    # --- writing ------------------------------------------------------------------------

    def _flush_once(self) -> bool:
        try:
            if not self._schema_ok:
                ensure_schema(self.db.engine)
                self._schema_ok = True
            self._write()
        except (StorageError, MonitorError) as exc:
            if _rejected(exc) and (self._samples or self._spans):
                self._drop_rejected(exc)
            self._failed(exc)
            return False
        except Exception as exc:  # a driver error outside SQLAlchemy's hierarchy
            self._failed(exc)
            return False
        self._backoff = 0.0
        if self._last_error:
            log.warning("tunewatch: database is reachable again; pending records written")
            self._last_error = ""
        return True

    def _drop_rejected(self, exc: Exception) -> None:
        """The database refused the rows themselves: retrying them would stop all telemetry.

        Pending samples and spans are dropped and counted (``write_rejected``); aggregates and
        counters, plain numbers, are written again on the next flush.
        """
        n = len(self._samples) + len(self._spans)
        self._samples, self._spans = [], []
        self.count(DROP_PREFIX + "write_rejected", n)
        log.error("tunewatch: the database refused %d sampled rows and spans, dropped them: %s",
                  n, str(exc).splitlines()[0][:300])  # fmt: skip

    def _failed(self, exc: Exception) -> None:
        cap = self.settings.retry_max_backoff_s
        self._backoff = min(cap, max(0.1, self._backoff * 2)) if cap > 0 else 0.0
        message = str(exc).splitlines()[0]
        if message != self._last_error:
            level = logging.ERROR if isinstance(exc, SchemaOutOfDate) else logging.WARNING
            log.log(level, "tunewatch: cannot write telemetry (%s); retrying", message)
            self._last_error = message
        self._trim_aggregates()

    def _trim_aggregates(self) -> None:
        # While the database is down, keep at most an hour of intervals per key.
        limit = max(1, int(3600 / self.settings.aggregate_interval_s)) * max(1, len(self._seen))
        if len(self._aggs) <= limit:
            return
        for slot in sorted(self._aggs, key=lambda s: s[1])[: len(self._aggs) - limit]:
            self.count(DROP_PREFIX + "aggregate_overflow", self._aggs.pop(slot).calls)

    def _write(self) -> None:
        now = datetime.now(timezone.utc)
        dirty = [(slot, agg) for slot, agg in self._aggs.items() if agg.dirty]
        samples, spans = self._samples, self._spans
        seen = list(self._seen_dirty)
        step = self.settings.aggregate_interval_s
        with self._drop_lock:
            shadow = [(k, list(self._shadow[k])) for k in self._shadow_dirty]
        with self.db.session() as s:
            dialect = s.get_bind().dialect.name
            for slot, agg in dirty:
                s.execute(_upsert_aggregate(dialect, self.instance_id, slot, agg, now, step))
            insert_rows(s, schema.Sample, samples)
            insert_rows(s, schema.CallSpan, spans)
            for key in seen:
                s.execute(_upsert_seen(dialect, key, self._seen[key]))
            for name, value in list(self.counters.items()):
                s.execute(_upsert_counter(dialect, self.instance_id, name, value, now))
            for key_slot, acc in shadow:
                s.execute(_upsert_shadow(dialect, self.instance_id, key_slot, acc, now))
        self._samples, self._spans = [], []
        self._count_raw(samples)
        self._seen_dirty.difference_update(seen)
        with self._drop_lock:  # clean unless a comparison arrived while we wrote
            for key_slot, acc in shadow:
                if self._shadow[key_slot] == acc:
                    self._shadow_dirty.discard(key_slot)
        for _slot, agg in dirty:
            agg.dirty = False
        self._forget_closed_intervals(now)

    # --- the raw reservoir ---------------------------------------------------------------

    def _count_raw(self, samples: list[dict[str, Any]]) -> None:
        """Add written raw bytes per version; clear the oldest raw rows of versions over budget."""
        written: dict[tuple[str, str], int] = {}
        for row in samples:
            if row["raw_bytes"]:
                mv = (row["model"], row["version"])
                written[mv] = written.get(mv, 0) + row["raw_bytes"]
        for mv, n in written.items():
            self._raw_used[mv] = self._raw_used.get(mv, 0) + n
        budget = int(self.settings.raw_reservoir_mb * (1 << 20))
        now = time.monotonic()
        for mv, used in list(self._raw_used.items()):
            # Other processes (and earlier runs) write raw rows of the same version too: the
            # true total is re-read on this process's first write and every RAW_RESYNC_S.
            stale = mv in written and now - self._raw_synced.get(mv, -RAW_RESYNC_S) >= RAW_RESYNC_S
            if not stale and used <= budget:
                continue
            try:
                if stale:
                    self._raw_used[mv], self._raw_synced[mv] = self._raw_total(mv), now
                self._trim_raw(mv, budget)
            except Exception as exc:  # telemetry is written; the next flush tries again
                log.warning("tunewatch: cannot trim raw samples of %s:%s (%s)", *mv, exc)

    def _raw_total(self, mv: tuple[str, str]) -> int:
        from sqlalchemy import func, select

        t = schema.Sample
        stmt = select(func.sum(t.raw_bytes)).where(t.model == mv[0], t.version == mv[1])
        with self.db.session() as s:
            return int(s.execute(stmt).scalar() or 0)

    def _trim_raw(self, mv: tuple[str, str], budget: int) -> None:
        """Clear raw arrays (keeping the summary rows) of ``mv``'s oldest samples until its
        raw bytes fit ``budget``, in at most RAW_CLEAR_BATCHES batches of RAW_CLEAR_BATCH."""
        from sqlalchemy import select, update

        t = schema.Sample
        mine = (t.model == mv[0], t.version == mv[1], t.raw_bytes.is_not(None))
        for _ in range(RAW_CLEAR_BATCHES):
            excess = self._raw_used[mv] - budget
            if excess <= 0:
                return
            stmt = select(t.id, t.raw_bytes, t.ts).where(*mine).order_by(t.ts, t.id)
            floor = self._raw_floor.get(mv)  # older rows are cleared already: skip them fast
            if floor is not None:
                stmt = stmt.where(t.ts >= floor)
            ids, freed = [], 0
            with self.db.session() as s:
                for row_id, size, ts in s.execute(stmt.limit(RAW_CLEAR_BATCH)).all():
                    if freed >= excess:
                        break
                    ids.append(row_id)
                    freed += int(size or 0)
                    self._raw_floor[mv] = ts
                if ids:
                    s.execute(update(t).where(t.id.in_(ids)).values(raw=None, raw_bytes=None))
            if ids:
                self._raw_used[mv] -= freed
                self.count("raw_rows_cleared", len(ids))
            elif floor is not None:  # a row backfilled before the floor: look from the start
                del self._raw_floor[mv]
            else:  # nothing left to clear: the total was stale
                self._raw_used[mv] = 0
                return

    def _forget_closed_intervals(self, now: datetime) -> None:
        horizon_s = now.timestamp() - 6 * self.settings.aggregate_interval_s
        for slot in [s for s, a in self._aggs.items() if s[1] < horizon_s * 1e9 and not a.dirty]:
            del self._aggs[slot]
        with self._drop_lock:
            for key_slot in [k for k in self._shadow if k[1] < horizon_s]:
                if key_slot not in self._shadow_dirty:
                    del self._shadow[key_slot]


_LIVE: weakref.WeakSet[Writer] = weakref.WeakSet()


def _restart_after_fork() -> None:
    for writer in list(_LIVE):
        writer._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_after_fork)


def _insert(dialect: str, table: Any) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise StorageError(f"database dialect {dialect!r} is not supported: use SQLite or PostgreSQL")


def _rejected(exc: Exception) -> bool:
    """Did the database refuse the data (a bad value or constraint), not fail to answer?"""
    from sqlalchemy.exc import DataError, IntegrityError

    return isinstance(exc.__cause__, (DataError, IntegrityError))


def _upsert_aggregate(
    dialect: str,
    instance: str,
    slot: tuple[Key, int, str],
    agg: Agg,
    now: datetime,
    interval_s: int,
) -> Any:
    key, start_ns, suffix = slot
    p50, p95, p99 = sketch.quantiles(agg.buckets, (0.5, 0.95, 0.99))
    values = {
        "calls": agg.calls, "errors": agg.errors, "items": agg.items, "sum_ms": agg.sum_ms,
        "min_ms": agg.min_ms, "max_ms": agg.max_ms, "p50_ms": p50, "p95_ms": p95,
        "p99_ms": p99, "buckets": {str(k): v for k, v in agg.buckets.items()},
        "error_types": dict(agg.error_types), "updated_at": now,
    }  # fmt: skip
    stmt = _insert(dialect, schema.LatencyAggregate).values(
        instance_id=instance + suffix, model=key.model, version=key.version, arm=key.arm,
        interval_start=datetime.fromtimestamp(start_ns / 1e9, timezone.utc),
        interval_s=interval_s, **values,
    )  # fmt: skip
    return stmt.on_conflict_do_update(
        index_elements=["instance_id", "model", "version", "arm", "interval_start"], set_=values
    )


def _upsert_seen(dialect: str, key: Key, span: list[datetime]) -> Any:
    table = schema.ModelVersionSeen.__table__
    stmt = _insert(dialect, schema.ModelVersionSeen).values(
        model=key.model, version=key.version, kind=key.kind,
        first_seen_at=span[0], last_seen_at=span[1],
    )  # fmt: skip
    return stmt.on_conflict_do_update(
        index_elements=["model", "version"],
        set_={
            "first_seen_at": _least(dialect, table.c.first_seen_at, stmt.excluded.first_seen_at),
            "last_seen_at": _greatest(dialect, table.c.last_seen_at, stmt.excluded.last_seen_at),
        },
    )


def _least(dialect: str, a: Any, b: Any) -> Any:
    from sqlalchemy import func

    return func.min(a, b) if dialect == "sqlite" else func.least(a, b)


def _greatest(dialect: str, a: Any, b: Any) -> Any:
    from sqlalchemy import func

    return func.max(a, b) if dialect == "sqlite" else func.greatest(a, b)


def _upsert_shadow(
    dialect: str, instance: str, slot: tuple[int, int], acc: list[float], now: datetime
) -> Any:
    values = {
        "compared": int(acc[0]), "agreed": int(acc[1]), "score_sum": float(acc[2]),
        "challenger_errors": int(acc[3]), "challenger_ms_sum": float(acc[4]), "updated_at": now,
    }  # fmt: skip
    stmt = _insert(dialect, schema.ShadowAggregate).values(
        instance_id=instance, experiment_id=slot[0],
        interval_start=datetime.fromtimestamp(slot[1], timezone.utc), **values,
    )  # fmt: skip
    return stmt.on_conflict_do_update(
        index_elements=["instance_id", "experiment_id", "interval_start"], set_=values
    )


def _upsert_counter(dialect: str, instance: str, name: str, value: int, now: datetime) -> Any:
    stmt = _insert(dialect, schema.TelemetryCounter).values(
        instance_id=instance, name=name, value=value, host=socket.gethostname(),
        pid=os.getpid(), note="", updated_at=now,
    )  # fmt: skip
    return stmt.on_conflict_do_update(
        index_elements=["instance_id", "name"], set_={"value": value, "updated_at": now}
    )


def _sample_dict(
    key: Key, ts: datetime, row: RowSample, source: str, request_id: str | None = None
) -> dict[str, Any]:
    return {
        "model": key.model, "version": key.version, "arm": key.arm, "ts": ts, "source": source,
        "input_kind": row.input_kind, "features": row.features, "outputs": row.outputs,
        "raw": row.raw, "raw_bytes": len(row.raw) if row.raw is not None else None,
        "request_id": request_id,
    }  # fmt: skip


def _log_span(key: Key, ts: datetime, ms: float) -> dict[str, Any]:
    return {
        "trace_id": None, "span_id": None, "parent_span_id": None, "name": "tunewatch.log",
        "model": key.model, "version": key.version, "arm": key.arm, "start_time": ts,
        "duration_ms": float(ms), "batch_size": 1, "status": "ok", "error_type": None,
        "source": "log", "attributes": {},
    }  # fmt: skip
