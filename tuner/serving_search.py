"""Search the serving configuration of a model under concurrent load, like Triton's Model Analyzer.

A model file from Olive, INC or Optimum comes with ORT's defaults; a deployment has more knobs
than the model: intra-op threads per session run, how many batches run at once (instances:
``batch_workers``, each on its own thread against the thread-safe session), the largest batch,
how long a batch may wait to fill and, for a model with an attention mask, how many rows of
like length run together (``trim_group_rows``: two concurrent runs of large groups can spill
a small L2 cache). :func:`search_serving` measures combinations of them
with ``clients`` concurrent callers that each send one row at a time (of its natural length,
when the model has an attention mask) and returns the one with the most calls per second whose
p99 latency is within the SLO. Measurements are counted in calls, not timed windows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from monitor.batching import LengthGroups, pad_rows
from tuner.errors import TunerError
from tuner.onnx_tools import Feeds, RuntimeOptions, cpu_count, load_session, num_rows, trim_padding

Progress = Callable[[str, int, int], None]
# The fastest configurations within the SLO re-measured before one is chosen.
CONFIRM_TOP = 3


@dataclass(frozen=True)
class ServingPoint:
    """One configuration as measured: its knobs, calls/s, p50/p99 and the mean batch.

    ``group_rows`` is the rows per length group of a padded batch (``trim_group_rows``);
    0 where it does not apply (no attention mask, or no batching).
    """

    threads: int
    batch_workers: int
    max_batch_size: int
    max_delay_ms: float
    throughput: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    group_rows: int = 0

    def to_config(self) -> dict[str, Any]:
        """The keys a deployment reads from a version's config to serve this way."""
        config: dict[str, Any] = {
            "runtime": {"threads": self.threads, "spinning": False},
            "batch_size": self.max_batch_size,
            "max_delay_ms": self.max_delay_ms,
            "batch_workers": self.batch_workers,
        }
        if self.group_rows:
            config["trim_group_rows"] = self.group_rows
        return config

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return asdict(self)


@dataclass(frozen=True)
class ServingSearch:
    """The chosen configuration (None if none ran), every point measured, and why."""

    best: ServingPoint | None
    points: tuple[ServingPoint, ...] = field(default_factory=tuple)
    clients: int = 32
    reason: str = ""
    # The finalists re-measured in turn: every run of each, in the order measured.
    confirmations: tuple[ServingPoint, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {
            "best": self.best.to_dict() if self.best else None,
            "points": [p.to_dict() for p in self.points],
            "confirmations": [p.to_dict() for p in self.confirmations],
            "clients": self.clients,
            "reason": self.reason,
        }


def _concat(items: Sequence[Mapping[str, np.ndarray]]) -> Feeds:
    """Stack single-row feeds of one shape."""
    return {k: np.concatenate([item[k] for item in items]) for k in items[0]}


def natural_rows(feeds: Feeds, mask: str | None) -> list[Feeds]:
    """Split feeds into single rows, each trimmed to its own length when there is a mask."""
    rows = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(num_rows(feeds))]
    return [trim_padding(r, mask) for r in rows] if mask else rows


def search_serving(
    path: Path | str,
    feeds: Feeds,
    *,
    slo_ms: float,
    mask: str | None = None,
    clients: int = 32,
    calls_per_client: int = 16,
    batch_sizes: Sequence[int] = (1, 4, 8, 16, 32),
    delays_ms: Sequence[float] = (1.0, 2.0, 5.0),
    group_rows: Sequence[int] = (2, 4, 8),
    graph_optimization: str = "all",
    progress: Progress | None = None,
    confirm_rounds: int = 2,
) -> ServingSearch:
    """Return the serving configuration with the most calls/s whose p99 is within ``slo_ms``.

    Every (threads, batch_workers) pair that fits the cores (threads x workers <= nproc) is
    measured at each batch size (1: no batching, each caller runs the session itself) with
    a 2 ms delay and (with a ``mask``) length groups of 8 rows, or the first of ``group_rows``
    when 8 is not among them; the best batched one is then tried at the other delays and,
    with a ``mask``, at the other group sizes. The ``CONFIRM_TOP`` fastest within the SLO are
    then measured ``confirm_rounds`` more times in turn and judged by their medians: one
    window of a few hundred calls once put a 1 ms delay ahead on a busy machine.

    Raises:
        TunerError: ``slo_ms``, ``clients`` or ``calls_per_client`` is not positive,
            ``confirm_rounds`` is negative, or
            ``group_rows`` is empty or holds a value that is not an integer >= 1.
    """
    if slo_ms <= 0 or clients < 1 or calls_per_client < 1 or confirm_rounds < 0:
        raise TunerError(
            f"slo_ms={slo_ms}, clients={clients}, calls_per_client={calls_per_client} "
            f"must all be positive and confirm_rounds={confirm_rounds} not negative"
        )
    groups = _check_groups(group_rows)
    base = 8 if 8 in groups else groups[0]
    rows = natural_rows(feeds, mask)
    report = progress or (lambda step, done, total: None)
    cores = cpu_count()
    shapes = [(t, w) for t in sorted({1, cores}) for w in range(1, cores // t + 1)]
    plan = [(t, w, b, 2.0) for t, w in shapes for b in batch_sizes if b > 1 or w == 1]
    points: list[ServingPoint] = []
    for i, (t, w, b, d) in enumerate(plan):
        report(f"serving t{t} x{w} batch {b}", i, len(plan))
        points.append(_measure(path, rows, mask, t, w, b, d, base, clients, calls_per_client,
                               graph_optimization))  # fmt: skip
    batched = [p for p in points if p.max_batch_size > 1]
    lead = _best(batched, slo_ms)
    if lead is not None:
        for d in delays_ms:
            if d != lead.max_delay_ms:
                points.append(_measure(path, rows, mask, lead.threads, lead.batch_workers,
                                       lead.max_batch_size, d, base, clients, calls_per_client,
                                       graph_optimization))  # fmt: skip
        lead = _best([p for p in points if p.max_batch_size > 1], slo_ms)
    if lead is not None and mask:
        for g in groups:
            if g != base:
                points.append(_measure(path, rows, mask, lead.threads, lead.batch_workers,
                                       lead.max_batch_size, lead.max_delay_ms, g, clients,
                                       calls_per_client, graph_optimization))  # fmt: skip
    finalists = sorted((p for p in points if p.p99_ms <= slo_ms), key=lambda p: p.throughput,
                       reverse=True)[:CONFIRM_TOP]  # fmt: skip
    runs: list[list[ServingPoint]] = [[p] for p in finalists]
    confirmations: list[ServingPoint] = []
    if len(finalists) > 1:
        for r in range(confirm_rounds):
            for runs_of, p in zip(runs, finalists, strict=True):
                report(f"serving confirm {_label(p)}", r, confirm_rounds)
                again = _measure(path, rows, mask, p.threads, p.batch_workers, p.max_batch_size,
                                 p.max_delay_ms, p.group_rows or base, clients, calls_per_client,
                                 graph_optimization)  # fmt: skip
                runs_of.append(again)
                confirmations.append(again)
    report("serving", len(plan), len(plan))
    medians = [_median(r) for r in runs]
    best = _best(medians, slo_ms) if medians else _best(points, slo_ms)
    within = best is not None and best.p99_ms <= slo_ms
    runs_note = f" (medians of {confirm_rounds + 1} runs)" if confirmations else ""
    reason = (
        f"{_label(best)}: {best.throughput:.1f} calls/s, p99 {best.p99_ms:.1f} ms "
        f"{'<=' if within else '>'} SLO {slo_ms:g} ms with {clients} concurrent clients"
        f"{runs_note}"
        if best
        else "nothing measured"
    )
    return ServingSearch(best, tuple(points), clients, reason, tuple(confirmations))


def _median(runs: Sequence[ServingPoint]) -> ServingPoint:
    """One configuration's runs as one point: the median of each measured figure."""
    first = runs[0]
    return replace(
        first,
        throughput=float(np.median([p.throughput for p in runs])),
        p50_ms=float(np.median([p.p50_ms for p in runs])),
        p99_ms=float(np.median([p.p99_ms for p in runs])),
        mean_batch=float(np.median([p.mean_batch for p in runs])),
    )


def _check_groups(group_rows: Sequence[int]) -> list[int]:
    """The distinct group sizes in order; each an integer >= 1."""
    bad = [g for g in group_rows if isinstance(g, bool) or not isinstance(g, int) or g < 1]
    if bad or not group_rows:
        raise TunerError(
            f"group_rows={tuple(group_rows)!r} is invalid: give one or more integers >= 1, "
            "e.g. (2, 4, 8)"
        )
    return list(dict.fromkeys(group_rows))


def _best(points: Sequence[ServingPoint], slo_ms: float) -> ServingPoint | None:
    """Most calls/s within the SLO; if none is within it, the lowest p99."""
    within = [p for p in points if p.p99_ms <= slo_ms]
    if within:
        return max(within, key=lambda p: p.throughput)
    return min(points, key=lambda p: p.p99_ms, default=None)


def _label(p: ServingPoint | None) -> str:
    if p is None:
        return "-"
    groups = f", length groups of {p.group_rows} rows" if p.group_rows else ""
    return (
        f"{p.threads} thread(s) x {p.batch_workers} worker(s), max batch {p.max_batch_size}, "
        f"max delay {p.max_delay_ms:g} ms{groups}"
    )


def _measure(
    path: Path | str,
    rows: list[Feeds],
    mask: str | None,
    threads: int,
    workers: int,
    batch: int,
    delay_ms: float,
    group_rows: int,
    clients: int,
    calls: int,
    graph_optimization: str,
) -> ServingPoint:
    """Run ``clients`` closed-loop callers for ``calls`` calls each under one configuration."""
    from monitor.batching import DynamicBatcher

    options = RuntimeOptions(threads=threads, graph_optimization=graph_optimization)
    session = load_session(path, options)
    batches: list[int] = []
    batcher: Any = None
    groups: LengthGroups | None = None
    if batch > 1:
        if mask:  # as a deployment of a config with trim_padding runs it

            def open_session(n: int) -> Any:
                return session if n == threads else load_session(path, replace(options, threads=n))

            groups = LengthGroups(open_session, mask, group_rows, threads)

        def run_batch(feed: Feeds) -> list[np.ndarray]:
            batches.append(num_rows(feed))
            if groups is not None:
                return groups(feed)
            return [np.asarray(o) for o in session.run(None, feed)]

        batcher = DynamicBatcher(
            run_batch, max_batch_size=batch, max_delay_ms=delay_ms, workers=workers,
            stack=(lambda items: pad_rows(items, mask)) if mask else _concat,
            unstack=lambda out, n: [[o[i : i + 1] for o in out] for i in range(n)],
        )  # fmt: skip
        call: Callable[[Feeds], Any] = batcher
    else:

        def call(feed: Feeds) -> Any:
            return session.run(None, feed)

    for row in rows[:4]:  # warm-up: first runs allocate
        session.run(None, row)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        start.wait()
        for j in range(calls):
            row = rows[(k * calls + j) % len(rows)]
            t0 = time.perf_counter()
            call(row)
            latencies[k].append(time.perf_counter() - t0)

    threads_ = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for th in threads_:
        th.start()
    start.wait()
    began = time.perf_counter()
    for th in threads_:
        th.join()
    wall = time.perf_counter() - began
    if batcher is not None:
        batcher.close()
    if groups is not None:
        groups.close()
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    return ServingPoint(
        threads=threads,
        batch_workers=workers,
        max_batch_size=batch,
        max_delay_ms=delay_ms if batch > 1 else 0.0,
        throughput=float(lat.size / max(wall, 1e-9)),
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        mean_batch=float(np.mean(batches)) if batches else 1.0,
        group_rows=group_rows if batch > 1 and mask else 0,
    )
