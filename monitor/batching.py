"""Dynamic batching: many concurrent single-item calls become a few batched model calls.

Models on CPU and GPU are far cheaper per item in batches, but a server handles one request
per thread. :class:`DynamicBatcher` sits between them: callers hand in one item and block on
their own result while a worker thread gathers pending items into a batch (up to
``max_batch_size``, waiting at most ``max_delay_ms`` after the batch's first item arrived),
runs the batch function once and hands each caller its own row of the output. With
``workers=N`` (Triton's model-instance count) N batches can run at once, for a batch
function that releases the GIL (ONNX Runtime, torch) on a machine with cores to spare.

A batch is a unit of work, not of failure: an item that cannot be stacked with the others runs
alone, and (with ``isolate_errors``, the default) a batch whose function raises is retried one
item at a time, so each caller gets its own result or its own exception and one bad request
never fails its neighbours.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from time import monotonic
from typing import Any, Protocol

import numpy as np

from monitor.errors import ConfigError, MonitorError

log = logging.getLogger("tunewatch")


class Overloaded(MonitorError):
    """The batcher's queue is full: shed this request (e.g. HTTP 503) or raise ``max_queue``."""


class BatcherClosed(MonitorError, RuntimeError):
    """The batcher was closed; create a new one to submit more items."""


class _Sink(Protocol):
    """What the worker needs from a waiting caller: a Future or the lighter :class:`_Slot`."""

    def set_running_or_notify_cancel(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException | None) -> None: ...


class _Slot:
    """A one-shot result for a blocking caller: a pre-acquired lock the worker releases.

    Cheaper than a ``Future`` (no Condition, no callbacks) on the path every item takes.
    """

    __slots__ = ("_done", "_error", "_result")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._result: Any = None
        self._error: BaseException | None = None

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, result: Any) -> None:
        self._result = result
        self._done.release()

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._done.locked():  # answered already; the caller may be reading it now
            raise RuntimeError("result already set")
        self._error = exception
        self._done.release()

    def wait(self, timeout: float | None) -> Any:
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"no result within timeout={timeout} s; the item is still queued")
        if self._error is not None:
            raise self._error
        return self._result


def stack_rows(items: Sequence[Any]) -> Any:
    """Default stack: ``np.stack`` the items, or stack each key of dict items (an ONNX feed)."""
    first = items[0]
    if isinstance(first, Mapping):
        return {k: np.stack([item[k] for item in items]) for k in first}
    return np.stack(items)


def unstack_rows(output: Any, n: int) -> list[Any]:
    """Default unstack: split a batch output into ``n`` per-item results along axis 0.

    An array gives its rows; a dict of arrays gives one dict of rows per item; a list or tuple
    whose elements are all arrays with ``n`` rows (what ``InferenceSession.run`` returns) gives
    one list (tuple) of rows per item; any other sequence of length ``n`` is taken as the
    per-item results themselves. Pass ``unstack=`` when your outputs are ambiguous.

    Raises:
        ValueError: the output cannot be split into ``n`` results.
    """
    if _rows(output) == n:
        iloc = getattr(output, "iloc", None)  # a DataFrame iterates over its columns
        return [iloc[i] for i in range(n)] if iloc is not None else list(output)
    if isinstance(output, Mapping) and all(_rows(v) == n for v in output.values()):
        return [{k: v[i] for k, v in output.items()} for i in range(n)]
    if isinstance(output, (list, tuple)):
        if output and all(_rows(o) == n for o in output):
            kind = tuple if isinstance(output, tuple) else list
            return [kind(o[i] for o in output) for i in range(n)]
        if len(output) == n:
            return list(output)
    raise ValueError(
        f"cannot split the batch function's output ({_describe(output)}) into {n} results: "
        "return an array with one row per item, a dict or list of such arrays, or a sequence "
        "of per-item results, or pass unstack="
    )


def trim_padding(feeds: Mapping[str, Any], mask: str = "attention_mask") -> dict[str, Any]:
    """Cut every input's sequence axis to the longest real length in this batch.

    ``mask`` is the (batch, sequence) attention mask; columns after the last one any row uses
    are padding every row ignores, so a model whose outputs respect the mask gives the same
    outputs on the shorter batch, for less work. Inputs without that sequence axis pass as they
    are; a batch with nothing to trim is returned unchanged.

    >>> ids = np.array([[5, 6, 0, 0], [7, 0, 0, 0]])
    >>> out = trim_padding({"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)})
    >>> out["input_ids"].tolist()
    [[5, 6], [7, 0]]
    """
    m = feeds.get(mask)
    if m is None or np.ndim(m) != 2:
        return dict(feeds)
    used = np.flatnonzero(np.asarray(m).any(axis=0))
    length = max(1, int(used[-1]) + 1 if used.size else 1)
    width = m.shape[1]
    if length >= width:
        return dict(feeds)
    return {
        k: np.ascontiguousarray(v[:, :length]) if np.ndim(v) >= 2 and v.shape[1] == width else v
        for k, v in feeds.items()
    }


def pad_rows(items: Sequence[Mapping[str, Any]], mask: str) -> dict[str, np.ndarray]:
    """Stack single-row feeds of different sequence lengths, zero-padded on the right.

    Inputs that share ``mask``'s sequence axis are padded to the longest row; zeros there are
    padding a model that respects its attention mask ignores.
    """
    longest = max(int(item[mask].shape[1]) for item in items)
    out = {}
    for k in items[0]:
        parts = []
        for item in items:
            a, width = item[k], item[mask].shape[1]
            if a.ndim >= 2 and a.shape[1] == width < longest:
                a = np.pad(a, [(0, 0), (0, longest - width)] + [(0, 0)] * (a.ndim - 2))
            parts.append(a)
        out[k] = np.concatenate(parts)
    return out


def run_by_length(
    run: Callable[[dict[str, Any]], Sequence[Any]],
    feeds: Mapping[str, Any],
    mask: str,
    group_rows: int = 8,
    pool: Executor | None = None,
    parallel: int = 1,
) -> list[np.ndarray]:
    """Run a padded batch sorted by real length, in groups of ``group_rows`` rows each trimmed
    to its longest row; return every output in the caller's row order.

    The model then computes the sentences' tokens rather than the padding. A batch smaller than
    two groups is trimmed and run whole. With a ``pool`` of ``parallel`` threads the groups run
    at once (at least ``parallel`` groups when there are that many rows).
    """
    rows = len(feeds[mask])
    count = -(-rows // group_rows)
    if pool is not None and parallel > 1:
        count = max(count, min(parallel, rows))
    if count < 2 or (pool is None and rows < 2 * group_rows):
        return [np.asarray(o) for o in run(trim_padding(feeds, mask))]
    present = np.asarray(feeds[mask]) != 0
    lengths = (present * np.arange(1, present.shape[1] + 1)).max(axis=1)
    order = np.argsort(lengths, kind="stable")

    def one(group: np.ndarray) -> list[np.ndarray]:
        part = {k: np.ascontiguousarray(np.asarray(v)[group]) for k, v in feeds.items()}
        return [np.asarray(o) for o in run(trim_padding(part, mask))]

    groups = np.array_split(order, count)
    if pool is not None:  # longest groups first, so no core is left idle behind the last one
        parts = list(pool.map(one, groups[::-1]))[::-1]
    else:
        parts = [one(g) for g in groups]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(rows)
    return [np.concatenate([p[i] for p in parts])[inverse] for i in range(len(parts[0]))]


class LengthGroups:
    """Run padded batches by length groups (:func:`run_by_length`) on ONNX Runtime sessions.

    ``open_session(threads)`` builds a session with that many intra-op threads. With
    ``threads`` > 1, a batch of several groups runs them at once, one single-threaded run per
    core: a group of a few short sentences is too small for ORT's intra-op threads to share
    (on all-MiniLM-L6-v2 here, two intra-op threads ran 1.29x one; two groups at once 1.73x).
    A batch that is a single group runs on a session with ``threads`` intra-op threads, built
    the first time one comes.
    """

    def __init__(
        self, open_session: Callable[[int], Any], mask: str, group_rows: int = 8, threads: int = 1
    ) -> None:
        self._open, self.mask, self.group_rows = open_session, mask, group_rows
        self.threads = max(1, int(threads))
        self._lock = threading.Lock()
        self._sessions: dict[int, Any] = {}
        self._pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="tunewatch-groups")
            if self.threads > 1
            else None
        )
        self.session(1)  # built now: a bad artifact fails here, not on the first call

    def session(self, threads: int) -> Any:
        """The session with ``threads`` intra-op threads (built once)."""
        with self._lock:
            if threads not in self._sessions:
                self._sessions[threads] = self._open(threads)
            return self._sessions[threads]

    def __call__(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """Run one padded batch; outputs in the caller's row order."""
        rows = len(feeds[self.mask])
        if self._pool is None or rows < 2:
            whole = self.session(self.threads)
            return run_by_length(lambda f: whole.run(None, f), feeds, self.mask, self.group_rows)
        single = self.session(1)
        return run_by_length(lambda f: single.run(None, f), feeds, self.mask, self.group_rows,
                             pool=self._pool, parallel=self.threads)  # fmt: skip

    def close(self) -> None:
        """Stop the group threads (the sessions go with the object)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _rows(x: Any) -> int | None:
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape else None


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    if shape is not None:
        return f"{type(x).__name__} of shape {tuple(shape)}"
    if isinstance(x, (list, tuple, Mapping)):
        return f"{type(x).__name__} of length {len(x)}"
    return type(x).__name__


def _signature(item: Any) -> Hashable:
    """What must match for items to stack: shapes and dtypes (per key for dict items).

    A heuristic, not a guarantee: a group that still fails to stack runs one item at a time.
    """
    if type(item) is np.ndarray:
        return (item.shape, item.dtype.char)  # hashing the dtype object costs 3x more
    if isinstance(item, Mapping):
        return tuple((k, _array_signature(v)) for k, v in item.items())
    return _array_signature(item)


def _array_signature(x: Any) -> Hashable:
    shape = getattr(x, "shape", None)
    if shape is not None:
        return (tuple(shape), getattr(x, "dtype", None))
    try:
        return (np.shape(x), type(x).__name__)
    except Exception:  # ragged or odd: its own group, where it runs (or fails) alone
        return ("unstackable", id(x))


class DynamicBatcher:
    """Coalesce concurrent single-item calls into batched calls of ``batch_fn``.

    Args:
        batch_fn: runs one batch: takes ``stack(items)``, returns something ``unstack`` splits.
        max_batch_size: most items per call of ``batch_fn``; a full batch runs at once.
        max_delay_ms: longest wait after a batch's first item for more items to arrive.
        max_queue: most items waiting; beyond it ``submit`` raises :class:`Overloaded`.
        stack: items -> batch input. Default :func:`stack_rows` (numpy rows or dict feeds);
            with it, items whose shapes or dtypes differ go into separate batches. A custom
            stack gets every pending item; if it raises, the items are split by shape and
            dtype and retried, and items that still cannot stack run one at a time.
        unstack: ``(output, n)`` -> ``n`` results. Default :func:`unstack_rows`.
        isolate_errors: when a batch raises, rerun its items one at a time so each caller
            gets its own result or exception (``batch_fn`` must be safe to call again, as
            inference is). When false, every caller in the failed batch gets the exception.
        name: names the worker threads and the stats.
        workers: batches that may run at once, each on its own thread; ``batch_fn`` must then
            be safe to call from several threads (an ORT session or a torch module in
            inference mode is). Give each worker about ``cores / intra-op threads``.

    Stacking failures never fail other callers, whatever ``isolate_errors`` says.

    >>> double = DynamicBatcher(lambda x: 2 * x, max_batch_size=8, max_delay_ms=1.0)
    >>> double(np.array([1.0, 2.0]))
    array([2., 4.])
    >>> double.submit(np.array([3.0, 4.0])).result()
    array([6., 8.])
    >>> double.close()
    >>> double.stats()["items"]
    2
    """

    def __init__(
        self,
        batch_fn: Callable[[Any], Any],
        *,
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 10_000,
        stack: Callable[[Sequence[Any]], Any] | None = None,
        unstack: Callable[[Any, int], Sequence[Any]] | None = None,
        isolate_errors: bool = True,
        name: str = "batcher",
        workers: int = 1,
    ) -> None:
        _check_settings(batch_fn, max_batch_size, max_delay_ms, max_queue)
        if isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 1):
            raise ConfigError(f"workers={workers!r} is invalid: use an integer >= 1")
        self.name = name
        self._fn = batch_fn
        self._max = max_batch_size
        self._delay = max_delay_ms / 1000.0
        self._max_queue = max_queue
        self._group = stack is None  # only the default stack needs shape-matched groups
        self._stack: Callable[[Sequence[Any]], Any] = stack or stack_rows
        self._unstack: Callable[[Any, int], Sequence[Any]] = unstack or unstack_rows
        self._isolate = isolate_errors
        self._workers = workers
        self._closed = False
        self._counts = {"batches": 0, "batched_items": 0, "items": 0, "errors": 0, "retried": 0}
        self._rejected = 0
        self._start()
        _LIVE.add(self)

    def _start(self) -> None:
        self._count_lock = threading.Lock()  # workers update the counters concurrently
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[tuple[Any, _Sink, float]] = deque()
        self._threads = [
            threading.Thread(target=self._loop, name=f"tunewatch-{self.name}-{i}", daemon=True)
            for i in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    # --- caller side (the hot path) -------------------------------------------------------

    def __call__(self, item: Any, timeout: float | None = None) -> Any:
        """Run ``item`` in the next batch and return its result (or raise its exception).

        Raises:
            Overloaded: ``max_queue`` items are already waiting.
            BatcherClosed: :meth:`close` was called.
            TimeoutError: no result within ``timeout`` seconds (the item still runs).
        """
        slot = _Slot()
        self._put(item, slot)
        return slot.wait(timeout)

    def submit(self, item: Any) -> Future[Any]:
        """Queue ``item`` and return a Future of its result (``asyncio.wrap_future`` awaits it).

        Cancelling the Future before its batch starts keeps the item out of the batch.

        Raises:
            Overloaded: ``max_queue`` items are already waiting.
            BatcherClosed: :meth:`close` was called.
        """
        future: Future[Any] = Future()
        self._put(item, future)
        return future

    def _put(self, item: Any, sink: _Sink) -> None:
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is closed: create a new one")
            n = len(self._pending)
            if n >= self._max_queue:
                self._rejected += 1
                raise Overloaded(
                    f"batcher {self.name!r} has max_queue={self._max_queue} items waiting: "
                    "shed load or raise max_queue"
                )
            self._pending.append((item, sink, monotonic()))
            # Wake a worker only when it can act: a first item to time, or a full batch.
            if n == 0 or n + 1 == self._max:
                self._cond.notify()

    # --- worker side ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._dispatch(batch)
            except BaseException as exc:  # a bug here must not leave callers waiting forever
                log.exception("tunewatch: batcher %r failed to dispatch a batch", self.name)
                for _, sink, _ in batch:
                    _deliver_error(sink, exc)

    def _next_batch(self) -> list[tuple[Any, _Sink, float]] | None:
        """Wait for the next batch: full, or ``max_delay_ms`` old; None once closed and empty."""
        with self._cond:
            pending = self._pending
            while True:
                while not pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                # The oldest item sets the deadline; another worker may take it meanwhile.
                while pending and len(pending) < self._max and not self._closed:
                    remaining = pending[0][2] + self._delay - monotonic()
                    if remaining <= 0.0:
                        break
                    self._cond.wait(remaining)
                if pending:
                    batch = [pending.popleft() for _ in range(min(len(pending), self._max))]
                    if pending and self._workers > 1:
                        self._cond.notify()  # leftovers: an idle worker starts timing them
                    return batch

    def _dispatch(self, batch: list[tuple[Any, _Sink, float]]) -> None:
        live = [(item, sink) for item, sink, _ in batch if sink.set_running_or_notify_cancel()]
        if self._group:
            self._run_groups(live)
        elif live:
            self._run(live, grouped=False)

    def _run_groups(self, entries: list[tuple[Any, _Sink]]) -> None:
        """Run items of matching shapes and dtypes together, one batch per signature."""
        groups: dict[Hashable, list[tuple[Any, _Sink]]] = {}
        for entry in entries:
            groups.setdefault(_signature(entry[0]), []).append(entry)
        for group in groups.values():
            self._run(group, grouped=True)

    def _run(self, group: list[tuple[Any, _Sink]], grouped: bool) -> None:
        """Run one group as a batch; fall back to smaller groups or single items if it must."""
        try:
            stacked = self._stack([item for item, _ in group])
        except Exception:
            # An item that cannot stack must not fail the others. A custom stack that refused
            # a mix (say, sequences of two lengths) gets shape-matched groups first.
            if grouped or len(group) == 1:
                self._run_singly(group)
            else:
                self._run_groups(group)
            return
        try:
            results = self._call(stacked, len(group))
        except BaseException as exc:
            if self._isolate and len(group) > 1 and isinstance(exc, Exception):
                self._count(retried=1)
                self._run_singly(group)
            else:
                for _, sink in group:
                    self._fail(sink, exc)
            return
        self._count(items=len(group))
        for (_, sink), result in zip(group, results):
            sink.set_result(result)

    def _run_singly(self, group: list[tuple[Any, _Sink]]) -> None:
        for item, sink in group:
            try:
                result = self._call(self._stack([item]), 1)[0]
            except BaseException as exc:
                self._fail(sink, exc)
            else:
                self._count(items=1)
                sink.set_result(result)

    def _count(self, **increments: int) -> None:
        with self._count_lock:
            for key, value in increments.items():
                self._counts[key] += value

    def _call(self, stacked: Any, n: int) -> Sequence[Any]:
        self._count(batches=1, batched_items=n)
        results = self._unstack(self._fn(stacked), n)
        if len(results) != n:
            raise ValueError(f"unstack returned {len(results)} results for {n} items")
        return results

    def _fail(self, sink: _Sink, exc: BaseException) -> None:
        self._count(items=1, errors=1)
        sink.set_exception(exc)

    # --- lifecycle ------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Run every item already queued, then stop the worker; later calls raise.

        ``timeout`` bounds the wait for the queue to drain (None: wait until it has).
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - monotonic()))
        _LIVE.discard(self)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Counters: batch-function calls, items answered, mean batch size, errors, queue."""
        c = self._counts
        return {
            "name": self.name,
            "workers": self._workers,
            "batches": c["batches"],
            "items": c["items"],
            "mean_batch_size": c["batched_items"] / c["batches"] if c["batches"] else 0.0,
            "errors": c["errors"],
            "retried_batches": c["retried"],
            "rejected": self._rejected,
            "pending": len(self._pending),
        }

    def _after_fork(self) -> None:
        """In a forked child the worker thread is gone and parent callers do not exist."""
        if not self._closed:
            self._start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._pending)} pending"
        return (
            f"<DynamicBatcher {self.name!r} max_batch_size={self._max} "
            f"workers={self._workers} {state}>"
        )


def _deliver_error(sink: _Sink, exc: BaseException) -> None:
    with contextlib.suppress(Exception):  # answered before the failure: nothing left to tell
        sink.set_exception(exc)


def _check_settings(
    batch_fn: Any, max_batch_size: int, max_delay_ms: float, max_queue: int
) -> None:
    if not callable(batch_fn):
        raise TypeError(f"batch_fn of type {type(batch_fn).__name__} is not callable")
    if isinstance(max_batch_size, bool) or not (
        isinstance(max_batch_size, int) and max_batch_size >= 1
    ):
        raise ConfigError(f"max_batch_size={max_batch_size!r} is invalid: use an integer >= 1")
    if not (
        isinstance(max_delay_ms, (int, float)) and math.isfinite(max_delay_ms) and max_delay_ms >= 0
    ):
        raise ConfigError(
            f"max_delay_ms={max_delay_ms!r} is invalid: use milliseconds >= 0, e.g. 5.0"
        )
    if isinstance(max_queue, bool) or not (isinstance(max_queue, int) and max_queue >= 1):
        raise ConfigError(f"max_queue={max_queue!r} is invalid: use an integer >= 1")


_LIVE: weakref.WeakSet[DynamicBatcher] = weakref.WeakSet()


def _restart_after_fork() -> None:
    for batcher in list(_LIVE):
        batcher._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_after_fork)


__all__ = [
    "BatcherClosed", "DynamicBatcher", "Overloaded", "pad_rows", "run_by_length", "stack_rows",
    "trim_padding", "unstack_rows",
]  # fmt: skip
