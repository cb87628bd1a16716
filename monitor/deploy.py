"""Serving from the registry: the champion, a challenger share, shadow runs, dynamic batching.

A :class:`Deployment` holds an immutable routing state. A poller thread reloads the routing from
the database every ``poll_s`` seconds and, when it changed, builds the new state (sessions,
batchers) off the call path and swaps it in with one assignment: no call fails or waits during
a swap, and a promotion takes effect without restarting the serving process.

A deployment created before a fork (``gunicorn --preload``) keeps working in every child: ONNX
Runtime sessions and threads do not survive a fork, so the first call in the child sees that
its state belongs to another process and builds its own sessions, poller and shadow thread
(lazily, on the call path's slow branch; building them in an at-fork hook hung).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import logging
import os
import threading
import weakref
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from random import random
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.errors import ConfigError
from monitor.labels import MAX_ID_CHARS, REQUEST, RequestContext
from monitor.registry import Routing, VersionInfo, read_verified, routing

if TYPE_CHECKING:
    from monitor.core import Monitor

log = logging.getLogger("tunewatch.deploy")
Runner = Callable[[Any], Any]
AsyncRunner = Callable[[Any], Awaitable[Any]]
# This process's id, kept current by a fork hook that only assigns it (one list read per call).
_PID = [os.getpid()]


def unit_interval(key: str | bytes | int) -> float:
    """A stable hash of ``key`` in [0, 1): the same key always lands on the same arm.

    >>> unit_interval("user-42") == unit_interval("user-42")
    True
    """
    data = key if isinstance(key, bytes) else str(key).encode()
    return zlib.crc32(data) / 4294967296.0


@dataclass(frozen=True)
class _Arm:
    """One arm's model: ``call`` blocks the caller, ``acall`` leaves the event loop free."""

    call: Runner
    acall: AsyncRunner
    stats: Callable[[], dict[str, Any]] | None = None  # the arm's batcher counters


@dataclass(frozen=True)
class _State:
    """One routing generation of one process: what to call for each arm."""

    routing: Routing
    champion: _Arm
    challenger: _Arm | None
    shadow: _Arm | None
    closers: tuple[Callable[[], None], ...]
    pid: int


def agreement(a: Any, b: Any) -> tuple[bool, float]:
    """Do two outputs agree? Top-1 for class scores, cosine for embeddings, 1 % for values."""
    x, y = _first(a), _first(b)
    if x.shape != y.shape:
        return False, 0.0
    flat_x = x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    flat_y = y.reshape(len(y), -1) if y.ndim > 1 else y.reshape(-1, 1)
    if flat_x.shape[1] == 1:
        close = np.isclose(flat_x, flat_y, rtol=0.01, atol=1e-6)
        return bool(close.all()), float(close.mean())
    if flat_x.shape[1] < 128:
        same = flat_x.argmax(axis=1) == flat_y.argmax(axis=1)
        return bool(same.all()), float(same.mean())
    cos = (flat_x * flat_y).sum(1) / (
        np.linalg.norm(flat_x, axis=1) * np.linalg.norm(flat_y, axis=1) + 1e-12
    )
    return bool((cos >= 0.99).all()), float(cos.mean())


def _first(out: Any) -> np.ndarray:
    if isinstance(out, Mapping):
        out = next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out, dtype=np.float64)


class Deployment:
    """A callable serving ``model`` from the registry: ``dep(feed, key=None)``.

    ``feed`` is what the ONNX session takes (a dict of arrays by input name, or one array for
    a single-input model). With ``key`` the arm is sticky (a hash of the key against the
    challenger's share); without it, random. In shadow mode the champion answers and the
    challenger runs on a copy off the caller's path, its agreement recorded.
    """

    def __init__(
        self,
        monitor: Monitor,
        model: str,
        *,
        poll_s: float = 5.0,
        batching: bool | None = None,
        max_batch_size: int | None = None,
        max_delay_ms: float | None = None,
        batch_workers: int | None = None,
        shadow_queue: int = 1000,
    ) -> None:
        if poll_s <= 0:
            raise ConfigError(f"poll_s={poll_s!r} must be > 0 seconds")
        if batch_workers is not None and (
            isinstance(batch_workers, bool) or not isinstance(batch_workers, int)
            or batch_workers < 1
        ):  # fmt: skip
            raise ConfigError(f"batch_workers={batch_workers!r} is invalid: use an integer >= 1")
        self._mon = monitor
        self.model = model
        self.poll_s = poll_s
        self._batching = batching
        self._max_batch = max_batch_size
        self._max_delay = max_delay_ms
        self._batch_workers = batch_workers
        self._shadow_q: deque[tuple[_State, Any, Any]] = deque()
        self._shadow_max = shadow_queue
        self._shadow_wake = threading.Event()
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()  # one build and swap at a time; none after close
        self._state = self._build(routing(monitor.db, model))
        self.reloads = 0
        self._start_threads()
        _LIVE.add(self)

    def _start_threads(self) -> None:
        self._threads = [
            threading.Thread(target=self._poll, name=f"tunewatch-poll-{self.model}",
                             daemon=True),
            threading.Thread(target=self._shadow_loop, name=f"tunewatch-shadow-{self.model}",
                             daemon=True),
        ]  # fmt: skip
        for t in self._threads:
            t.start()

    # --- the call path ------------------------------------------------------------------

    def __call__(
        self, feed: Any, key: str | bytes | int | None = None, request_id: str | None = None
    ) -> Any:
        """Serve one call from the arm this call (or ``key``) routes to.

        ``request_id`` is stored with the call's sampled rows, so labels logged later join
        to it (``mon.log_labels``); it acts like ``with mon.context(request_id=...)``.
        """
        if request_id is not None:
            token = _set_request(request_id)
            try:
                return self._serve(feed, key)
            finally:
                REQUEST.reset(token)
        return self._serve(feed, key)

    def _serve(self, feed: Any, key: str | bytes | int | None) -> Any:
        state = self._state  # one read: a concurrent swap never mixes generations
        if state.pid != _PID[0]:
            state = self._adopt()
        arm = _route(state, key)
        result = arm.call(feed)
        if arm is state.champion and state.shadow is not None:
            self._offer_shadow(state, feed, result)
        return result

    async def acall(
        self, feed: Any, key: str | bytes | int | None = None, request_id: str | None = None
    ) -> Any:
        """``await dep.acall(feed, key=...)``: serve one call without blocking the event loop.

        With batching the call awaits the batcher's future; without it the ONNX Runtime call
        runs in the loop's default executor. ``request_id`` is stored with the call's sampled
        rows (see :meth:`__call__`).
        """
        if request_id is not None:
            token = _set_request(request_id)
            try:
                return await self._aserve(feed, key)
            finally:
                REQUEST.reset(token)
        return await self._aserve(feed, key)

    async def _aserve(self, feed: Any, key: str | bytes | int | None) -> Any:
        state = self._state
        if state.pid != _PID[0]:  # building sessions must not block the event loop
            state = await asyncio.get_running_loop().run_in_executor(None, self._adopt)
        arm = _route(state, key)
        result = await arm.acall(feed)
        if arm is state.champion and state.shadow is not None:
            self._offer_shadow(state, feed, result)
        return result

    def _offer_shadow(self, state: _State, feed: Any, result: Any) -> None:
        if random() < state.routing.share and len(self._shadow_q) < self._shadow_max:
            self._shadow_q.append((state, feed, result))
            self._shadow_wake.set()

    def _adopt(self) -> _State:
        """First call in a forked child: build this process's sessions and threads.

        The parent's sessions are unusable here; the child serves the routing the parent had
        until its own poller, started now, reads a newer one.
        """
        with self._reload_lock:
            old = self._state
            if old.pid == _PID[0]:
                return old  # another thread of this process adopted it first
            self._state = self._build(old.routing)
            if not self._stop.is_set():
                self._start_threads()
        _close_all(old.closers)  # the parent's batchers: their threads restarted empty here
        log.info("deployment %s: built for process %d after a fork", self.model, _PID[0])
        return self._state

    def _after_fork(self) -> None:
        """In a forked child: fresh locks and events; sessions and threads wait for a call."""
        _INHERITED.append(self._state)
        stopped = self._stop.is_set()
        self._stop = threading.Event()
        if stopped:
            self._stop.set()
        self._reload_lock = threading.Lock()
        self._shadow_wake = threading.Event()
        self._shadow_q.clear()
        self._threads = []

    @property
    def routing(self) -> Routing:
        """The routing currently served."""
        return self._state.routing

    def batching_stats(self) -> dict[str, dict[str, Any]]:
        """Counters of each batched arm now served (see ``DynamicBatcher.stats``), by arm."""
        state = self._state
        arms = {"champion": state.champion, "challenger": state.challenger}
        return {name: arm.stats() for name, arm in arms.items() if arm and arm.stats}

    # --- building states ----------------------------------------------------------------

    def _build(self, r: Routing) -> _State:
        closers: list[Callable[[], None]] = []
        champ = self._runner(r.champion, "champion", closers)
        challenger = shadow = None
        if r.challenger is not None and r.experiment_id is not None:
            arm = "shadow" if r.shadow else "challenger"
            # One shadow thread sends one copy at a time: a batcher would only add its
            # max_delay_ms to every shadow call and make the challenger look slower.
            runner = self._runner(r.challenger, arm, closers, batchable=not r.shadow)
            if r.shadow:
                shadow = runner
            else:
                challenger = runner
        return _State(r, champ, challenger, shadow, tuple(closers), os.getpid())

    def _runner(
        self, info: VersionInfo, arm: str, closers: list[Callable[[], None]],
        batchable: bool = True,
    ) -> _Arm:  # fmt: skip
        session = _session(info)
        names = [i.name for i in session.get_inputs()]
        wrapped = self._mon.wrap(session, name=info.model, version=info.version, arm=arm)
        batch = int(self._max_batch or info.config.get("batch_size") or 1)
        use_batching = batchable and (self._batching if self._batching is not None else batch > 1)
        if not use_batching:

            def call(feed: Any) -> Any:
                return wrapped.run(None, _as_feed(feed, names))

            async def acall(feed: Any) -> Any:
                # ORT releases the GIL: the loop serves other requests meanwhile. An executor
                # thread does not see this task's context: a request id travels with a copy.
                # The caller's OpenTelemetry span lives in the context too: always copy it.
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(None, contextvars.copy_context().run, call, feed)

            return _Arm(call, acall)
        from monitor.batching import DynamicBatcher, LengthGroups, pad_rows

        delay = float(self._max_delay if self._max_delay is not None
                      else info.config.get("max_delay_ms", 5.0))  # fmt: skip
        workers = int(self._batch_workers or info.config.get("batch_workers") or 1)
        run: Callable[[Any], Any] = lambda feed: session.run(None, feed)  # noqa: E731
        stack: Callable[[Any], Any] = _concat_rows
        mask = info.config.get("trim_padding")
        if mask:  # the tuner proved the outputs respect the mask: pad ragged rows, run by length
            threads = int((info.config.get("runtime") or {}).get("threads") or 1)

            def open_session(n: int) -> Any:
                return session if n == threads else _session(info, threads=n)

            groups = LengthGroups(open_session, mask, _group_rows(info), threads)
            run = groups
            stack = lambda items: pad_rows(items, mask)  # noqa: E731
        batcher: Any = DynamicBatcher(
            run, max_batch_size=max(1, batch),
            max_delay_ms=delay, stack=stack, unstack=_split_rows,
            name=f"{info.model}:{info.version}", workers=workers,
        )  # fmt: skip
        closers.append(batcher.close)  # runs what is queued: the group threads go after it
        if mask:
            closers.append(groups.close)

        async def submit(feed: Any) -> Any:
            return await asyncio.wrap_future(batcher.submit(_as_feed(feed, names)))

        # Each caller's call is recorded (its wait included) with its arm and version.
        per_call = self._mon.wrap(lambda feed: batcher(_as_feed(feed, names)), name=info.model,
                                  version=info.version, arm=arm)  # fmt: skip
        per_await = self._mon.wrap(submit, name=info.model, version=info.version, arm=arm)
        return _Arm(per_call, per_await, batcher.stats)

    # --- background threads -------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.reload()

    def reload(self) -> bool:
        """Re-read the routing now; swap in a new state when it changed. Never raises."""
        with self._reload_lock:
            if self._stop.is_set():
                return False
            try:
                fresh = routing(self._mon.db, self.model)
                if fresh.signature == self._state.routing.signature:
                    return False
                new = self._build(fresh)
            except Exception as exc:  # keep serving the current state
                log.error("deployment %s: routing reload failed, keeping the current one: %s",
                          self.model, exc)  # fmt: skip
                return False
            old, self._state = self._state, new
            self.reloads += 1
        log.info("deployment %s: now serving %s", self.model, _describe(fresh))
        threading.Timer(max(1.0, self.poll_s), _close_all, args=(old.closers,)).start()
        return True

    def _shadow_loop(self) -> None:
        while not self._stop.is_set():
            self._shadow_wake.wait(0.5)
            self._shadow_wake.clear()
            while self._shadow_q:
                state, feed, champion_out = self._shadow_q.popleft()
                if state is self._state:  # an old generation's runners are being closed
                    self._compare(state, feed, champion_out)

    def _compare(self, state: _State, feed: Any, champion_out: Any) -> None:
        assert state.shadow is not None and state.routing.experiment_id is not None
        t0 = perf_counter_ns()
        try:
            out = state.shadow.call(feed)
            agreed, score = agreement(champion_out, out)
            error = False
        except Exception:  # the challenger's failure is evidence, not a crash
            agreed, score, error = False, 0.0, True
        ms = (perf_counter_ns() - t0) / 1e6
        self._mon._writer.shadow(state.routing.experiment_id, agreed, score, error, ms)

    def close(self) -> None:
        """Stop polling and shadowing; drain batchers."""
        self._stop.set()
        self._shadow_wake.set()
        with self._reload_lock:  # a reload in flight finishes first, then nothing swaps
            _close_all(self._state.closers)


_LIVE: weakref.WeakSet[Deployment] = weakref.WeakSet()
# A parent's ONNX Runtime session must never be freed in a forked child: its destructor joins
# thread-pool threads that exist only in the parent, and hangs (seen at a worker's exit). The
# states a child inherited stay here for the life of the process, this list included.
_INHERITED: list[_State] = []
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_INHERITED))  # never released, even at exit


def _route(state: _State, key: str | bytes | int | None) -> _Arm:
    """The arm one call goes to: the challenger for its share of keys (or of random draws)."""
    r = state.routing
    if state.challenger is not None and not r.shadow:
        u = unit_interval(key) if key is not None else random()
        if u < r.share:
            return state.challenger
    return state.champion


def _set_request(request_id: Any) -> contextvars.Token[RequestContext | None]:
    """Give this call ``request_id``, keeping an enclosing context's ``sample`` flag.

    Monitoring never fails a call: an id is taken as its text, cut to the column's width.
    """
    outer = REQUEST.get()
    rid = str(request_id)[:MAX_ID_CHARS]
    return REQUEST.set(RequestContext(rid, outer.sample if outer is not None else False))


def _forked_child() -> None:
    _PID[0] = os.getpid()
    for dep in list(_LIVE):
        dep._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


def _close_all(closers: tuple[Callable[[], None], ...]) -> None:
    for close in closers:
        try:
            close()
        except Exception:  # closing an old generation must not disturb serving
            log.exception("closing an old routing generation failed")


def _describe(r: Routing) -> str:
    if r.challenger is None:
        return f"champion {r.champion.version}"
    mode = "shadow" if r.shadow else f"{r.share:.0%} to"
    return f"champion {r.champion.version}, {mode} challenger {r.challenger.version}"


def _concat_rows(items: Any) -> dict[str, np.ndarray]:
    """Join single-row feeds (each with a batch axis of 1) into one batch feed."""
    return {k: np.concatenate([item[k] for item in items]) for k in items[0]}


def _split_rows(outputs: Any, n: int) -> list[list[np.ndarray]]:
    """Give each caller its own row of every output, keeping the batch axis of 1."""
    return [[out[i : i + 1] for out in outputs] for i in range(n)]


DEFAULT_GROUP_ROWS = 8


def _group_rows(info: VersionInfo) -> int:
    """Rows per length group (config ``trim_group_rows``); a bad value logs and serves with 8.

    A registered config is read on every reload: a typo there must not stop serving.
    """
    value = info.config.get("trim_group_rows", DEFAULT_GROUP_ROWS)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    log.error("%s:%s config trim_group_rows=%r is invalid: use an integer >= 1; serving with "
              "groups of %d rows", info.model, info.version, value, DEFAULT_GROUP_ROWS)  # fmt: skip
    return DEFAULT_GROUP_ROWS


def _as_feed(feed: Any, names: list[str]) -> Any:
    if isinstance(feed, Mapping):
        return feed
    if len(names) == 1:
        return {names[0]: feed}
    raise ConfigError(f"this model takes inputs {names}: pass a dict of arrays by input name")


def _session(info: VersionInfo, threads: int | None = None) -> Any:
    """An ONNX Runtime session for a verified artifact with the tuned runtime options
    (``threads`` intra-op threads instead of the tuned count when given)."""
    import onnxruntime as ort

    model_bytes = read_verified(info)  # the session is built from the bytes that were hashed
    runtime = dict(info.config.get("runtime") or {})
    if threads is not None:
        runtime["threads"] = threads
        runtime["spinning"] = bool(runtime.get("spinning")) and threads > 1
    options = session_options(runtime)
    provider = str(runtime.get("provider") or "CPUExecutionProvider")
    if provider not in ort.get_available_providers():
        log.warning("%s:%s was tuned for %s, which is not available here: using the CPU",
                    info.model, info.version, provider)  # fmt: skip
        provider = "CPUExecutionProvider"
    return ort.InferenceSession(model_bytes, options, providers=[provider])


GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL",
}  # fmt: skip


def session_options(runtime: Mapping[str, Any]) -> Any:
    """ORT SessionOptions from a version's ``runtime`` config, as the tuner measured them.

    ``threads`` (intra-op; 0 or absent: ORT's default), ``spinning`` (off unless the search
    proved it pays: spin-waiting threads steal cores other work needs) and
    ``graph_optimization`` (one of :data:`GRAPH_LEVELS`). One sequential inter-op thread.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = int(runtime.get("threads") or 0)
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spinning = "1" if runtime.get("spinning", False) else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    level = GRAPH_LEVELS.get(str(runtime.get("graph_optimization", "all")), "ORT_ENABLE_ALL")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3
    return options
