"""The writer's cost of one huge sampled input, and the SIGKILL bound right after it.

Run: ``.venv/bin/python bench/writer.py`` (``--quick``: fewer repeats). BLAS and the process
are pinned to one core, so CPU time per wall time shows whether a step waited or worked.

For each input (6.5M x 1 and 102,400 x 64 float32, sampled at rate 1 with default settings):
- the call path's cost of the sampled call (the copy of the rows it can store);
- the writer's time: draining the call, converting its sample rows, writing them (one flush),
  measured by driving the writer's steps by hand on a closed monitor, so nothing else runs;
- peak RSS growth over the step.
Then a child process makes the same two huge sampled calls, keeps calling a cheap model and
is SIGKILLed: calls lost = what it had made up to one second before the kill, minus what is in
the database (the bound tests/test_reliability.py asserts).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # the BLAS pins above must precede numpy
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta

import numpy as np

from monitor import Monitor, storage
from monitor.status import summarize

SHAPES = {"6.5M x 1": (6_500_000, 1), "102,400 x 64": (102_400, 64)}
TARGET_MS = 50.0

CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from monitor import Monitor
    mon = Monitor(sys.argv[1], flush_interval_s=0.5, sample_rate=1.0)
    huge = mon.wrap(lambda x: x[:, :1], name="huge", version="v1")
    huge(np.zeros((6_500_000, 1), dtype=np.float32))
    huge(np.ones((102_400, 64), dtype=np.float32))
    mon.settings = mon.settings.replace(sample_rate=0.05)  # the default, for the next wrap
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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def writer_step(url: str, x: np.ndarray) -> dict[str, float]:
    """Call path and writer cost of one sampled call of ``x`` (median parts in ms)."""
    mon = Monitor(url, sample_rate=1.0)
    f = mon.wrap(lambda a: a[:, :1], name="huge", version="v1")
    mon.close()  # the writer thread stops: its steps run here, timed one by one
    writer = mon._writer
    t0 = time.perf_counter()
    f(x)
    call_ms = (time.perf_counter() - t0) * 1e3
    rss0 = _peak_rss_mb()
    w0, c0 = time.perf_counter(), time.thread_time()
    writer._drain()
    writer._convert_extras(deadline=None)
    rows = len(writer._samples)
    assert writer._flush_once(), "the flush failed"
    wall = time.perf_counter() - w0
    cpu = time.thread_time() - c0
    stored = storage.count_samples(storage.Database(url), "huge")
    mon.db.dispose()
    return {
        "call_ms": call_ms, "writer_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
        "cpu_per_wall": cpu / wall, "rows": rows,
        "stored": stored, "rss_mb": _peak_rss_mb() - rss0,
    }  # fmt: skip


def sigkill_after_huge(url: str) -> dict[str, float]:
    """Calls lost by a SIGKILL 3 s after two huge sampled calls (in seconds of calls)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-c", CHILD, url],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    progress: list[tuple[int, float]] = []
    while not progress or progress[-1][1] - progress[0][1] < 3.0:
        n, t = proc.stdout.readline().split()
        progress.append((int(n), float(t)))
    killed_at = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    db = storage.Database(url)
    status = summarize(db, window=timedelta(days=1))
    recorded = sum(m.calls for m in status.models if m.model == "killed")
    huge = sum(m.calls for m in status.models if m.model == "huge")
    db.dispose()
    # The newest progress line the database already covers: the calls lost are those after it.
    covered = max((t for n, t in progress if n <= recorded), default=progress[0][1])
    safe = max(n for n, t in progress if t <= killed_at - 1.0)
    return {
        "lost_s": killed_at - covered, "recorded": recorded, "made": progress[-1][0],
        "safe": safe, "huge_calls": huge,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    repeats = 3 if args.quick else 7
    tmp = tempfile.mkdtemp()
    results: dict[str, list[dict[str, float]]] = {}
    for label, shape in SHAPES.items():
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        results[label] = [
            writer_step(f"sqlite:///{tmp}/{label[:3]}-{i}.db", x) for i in range(repeats)
        ]
    kills = [sigkill_after_huge(f"sqlite:///{tmp}/kill-{i}.db") for i in range(3)]

    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
    cpu = names[0] if names else platform.processor()
    print(f"machine: {os.cpu_count()} cores, {cpu}; python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; repeats: {repeats}; "
          "pinned to one core, BLAS 1 thread")  # fmt: skip
    print("| sampled input | call path (copy) | writer wall time | writer CPU time | CPU / wall | "
          "rows stored | peak RSS growth | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        worst = max(r["writer_ms"] for r in runs)
        print(
            f"| {label} | {med['call_ms']:.2f} ms | {med['writer_ms']:.1f} ms (max "
            f"{worst:.1f}) | {med['cpu_ms']:.1f} ms | {med['cpu_per_wall']:.2f} | "
            f"{med['stored']:.0f} | +{med['rss_mb']:.1f} MB | <= {TARGET_MS:.0f} ms |"
        )
    for i, k in enumerate(kills, 1):
        print(
            f"| SIGKILL run {i}, right after both | {k['lost_s']:.2f} s of calls lost "
            f"({k['recorded']:,.0f} of {k['made']:,.0f} recorded, >= {k['safe']:,.0f} required; "
            f"huge calls recorded: {k['huge_calls']:.0f}) | | | | | | <= 1 s |"
        )


if __name__ == "__main__":
    main()
