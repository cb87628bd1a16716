"""The database goes away, the process is killed: calls never fail and little is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import numpy as np
import pandas as pd
from sqlalchemy.engine import make_url

from monitor import Monitor, storage
from monitor.status import summarize
from tests.helpers import TcpProxy


def _calls(url: str, model: str) -> int:
    db = storage.Database(url)
    try:
        return sum(
            m.calls for m in summarize(db, window=timedelta(days=1)).models if m.model == model
        )
    finally:
        db.dispose()


def test_closed_port_database_never_fails_a_call() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/none"  # nothing listens on port 1
    mon = Monitor(url, retry_max_backoff_s=0.2)
    wrapped = mon.wrap(lambda x: x * 2, name="m", version="v1")
    assert [wrapped(i) for i in range(100)] == [2 * i for i in range(100)]
    assert mon.flush(timeout=1.0) is False  # nothing reached the database
    assert mon.stats()["dropped"] == 0
    mon.close(timeout=0.5)


def test_server_going_away_buffers_then_writes_and_counts_drops(pg_url: str) -> None:
    engine = storage.create_db_engine(pg_url)
    storage.upgrade(engine)
    engine.dispose()
    real = make_url(pg_url)
    proxy = TcpProxy((real.host or "127.0.0.1", real.port or 5432))
    proxy.start()
    via_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
    mon = Monitor(
        via_proxy, sample_rate=1.0, span_sample_rate=0.0, buffer_rows=50, retry_max_backoff_s=0.2
    )
    wrapped = mon.wrap(lambda x: x.sum(), name="gone", version="v1")
    wrapped(np.ones((1, 2)))
    assert mon.flush(timeout=10)
    proxy.stop()  # the server goes away mid-run
    results = [wrapped(np.ones((1, 2))) for _ in range(80)]
    assert results == [2.0] * 80
    assert mon.flush(timeout=1.0) is False
    proxy.start()  # and comes back
    assert mon.flush(timeout=20)
    mon.close()
    proxy.stop()
    assert _calls(pg_url, "gone") == 81  # every call's latency survived (aggregates)
    db = storage.Database(pg_url)
    stored = storage.count_samples(db, "gone")
    dropped = storage.counters(db).get("dropped_buffer_full", 0)
    db.dispose()
    assert stored == 51 and dropped == 30  # 1 + 50 buffered rows written; the rest counted


CHILD = textwrap.dedent(
    """
    import sys, time
    from monitor import Monitor
    mon = Monitor(sys.argv[1], flush_interval_s=0.5)
    f = mon.wrap(lambda x: x, name="killed", version="v1")
    n = 0
    while True:
        for _ in range(200):
            f(1)
        n += 200
        print(n, time.time(), flush=True)
        time.sleep(0.01)
    """
)


def test_sigkill_loses_at_most_the_last_flush_interval(sqlite_url: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, sqlite_url], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    progress: list[tuple[int, float]] = []
    while not progress or progress[-1][1] - progress[0][1] < 3.0:
        line = proc.stdout.readline()
        n, t = line.split()
        progress.append((int(n), float(t)))
    killed_at = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Everything sent up to one flush interval (0.5 s) plus scheduling slack before the kill
    # must be in the database, and the database must be readable.
    safe = max(n for n, t in progress if t <= killed_at - 1.0)
    recorded = _calls(sqlite_url, "killed")
    assert safe <= recorded <= progress[-1][0]


def test_a_forked_child_keeps_recording(sqlite_url: str) -> None:
    mon = Monitor(sqlite_url)
    f = mon.wrap(lambda x: x, name="forked", version="v1")
    f(1)
    mon.flush()
    pid = os.fork()
    if pid == 0:  # the child: a pre-forking server's worker
        try:
            for i in range(100):
                f(i)
            ok = mon.flush(timeout=20)
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    f(2)
    mon.close()
    assert _calls(sqlite_url, "forked") == 102


def test_a_forked_child_does_not_write_the_parents_pending_rows_again(sqlite_url: str) -> None:
    from monitor.storage import Database, count_samples

    # A long flush interval: the three sampled calls are still pending when the fork happens.
    mon = Monitor(sqlite_url, sample_rate=1.0, flush_interval_s=60.0)
    f = mon.wrap(lambda x: 0, name="pending", version="v1")
    for i in range(3):
        f(np.full((1, 4), float(i)))  # one row each
    time.sleep(0.5)  # the writer has drained them into its row buffers by now
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if mon.flush(timeout=20) else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    mon.close()
    db = Database(sqlite_url)
    assert count_samples(db, "pending") == 3 and _calls(sqlite_url, "pending") == 3
    db.dispose()


def test_a_call_whose_input_cannot_be_sampled_loses_only_its_sample(sqlite_url: str) -> None:
    from monitor.storage import Database, count_samples

    class Unreadable:
        def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
            raise RuntimeError("this input cannot be read")

    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        f = mon.wrap(lambda x: 0, name="mixed", version="v1")
        for i in range(50):
            f(np.full((1, 4), float(i)))
        assert f(Unreadable()) == 0  # the model call itself is untouched
        for i in range(50):
            f(np.full((1, 4), float(i)))
        mon.flush()
        status = summarize(mon.db, model="mixed")
    db = Database(sqlite_url)
    assert _calls(sqlite_url, "mixed") == 101  # every call's latency is kept
    assert count_samples(db, "mixed") == 100
    db.dispose()
    assert status.drops_by_reason == {"internal_error": 1}


def test_huge_sampled_inputs_are_capped_before_conversion_and_flushes_go_on(
    sqlite_url: str,
) -> None:
    from monitor.storage import count_samples

    tall = np.zeros((6_500_000, 1), dtype=np.float32)
    wide = np.ones((102_400, 64), dtype=np.float32)
    with Monitor(sqlite_url, sample_rate=1.0, sample_cap_per_minute=1000) as mon:
        f = mon.wrap(lambda x: x[:, :1], name="huge", version="v1")
        f(tall)
        f(wide)
        for i in range(100):
            f(np.full((1, 4), float(i)))
        assert mon.flush(timeout=30)
        stored = count_samples(mon.db, "huge")
    assert _calls(sqlite_url, "huge") == 102
    # The per-minute cap: the first call's first 1,000 rows and nothing more (2,000 when the
    # calls straddle a minute boundary).
    assert stored in (1000, 2000)


def test_the_writer_converts_samples_within_its_budget_per_loop(sqlite_url: str) -> None:
    from monitor.storage import Database, count_samples

    mon = Monitor(sqlite_url, sample_rate=1.0)
    f = mon.wrap(lambda x: x, name="budget", version="v1")
    mon.close()  # the writer thread is gone: drive its steps by hand
    for i in range(20):
        f(np.full((3, 4), float(i)))
    writer = mon._writer
    writer._drain()
    assert len(writer._extras) == 20 and len(writer._samples) == 0
    writer._convert_extras(deadline=0.0)  # a budget already spent: one record, then stop
    assert len(writer._extras) == 19 and len(writer._samples) == 3
    writer._convert_extras(deadline=None)  # an explicit flush: everything
    assert len(writer._extras) == 0 and writer._flush_once()
    db = Database(sqlite_url)
    assert count_samples(db, "budget") == 60
    db.dispose()


def test_nan_features_are_stored_as_null_and_telemetry_keeps_flowing(db_url: str) -> None:
    with Monitor(db_url, sample_rate=1.0) as mon:
        f = mon.wrap(lambda x: x * 2, name="nan")
        f(np.array([[np.nan, 1.0], [np.inf, 2.0]]))  # PostgreSQL's JSON has no NaN
        assert mon.flush()
        f(np.ones((1, 2)))
        assert mon.flush()
        rows = storage.read_samples(mon.db, "nan")
    assert len(rows) == 3
    assert rows[0].features["x0"] is None and rows[0].features["x1"] == 1.0


def test_rows_the_database_refuses_are_dropped_and_counted_not_retried(pg_url: str) -> None:
    # PostgreSQL's JSON cannot hold a NUL character: the write of that batch is refused.
    engine = storage.create_db_engine(pg_url)
    storage.upgrade(engine)
    engine.dispose()
    with Monitor(pg_url, sample_rate=1.0, retry_max_backoff_s=0.05) as mon:
        f = mon.wrap(lambda x: 1.0, name="nul")
        f(pd.DataFrame({"text": ["a\x00b"]}))
        assert mon.flush()  # the refused row is dropped, not retried; the rest is written
        for _ in range(3):
            f(pd.DataFrame({"text": ["fine"]}))
        assert mon.flush()  # later calls are written
        rows = storage.read_samples(mon.db, "nul")
        status = summarize(mon.db, model="nul")
    assert [r.features["text"] for r in rows] == ["fine"] * 3
    assert status.drops_by_reason == {"write_rejected": 1}
    assert sum(m.calls for m in status.models) == 4  # every call's latency is kept
