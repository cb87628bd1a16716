"""What DynamicBatcher costs per item, and what it buys on a numpy model with 32 callers.

Run from the repository root: ``.venv/bin/python bench/batching_micro.py`` (about a minute on
two cores) or ``--quick``. Every figure is the median of ``--repeats`` runs in this one process;
batched and unbatched runs alternate so machine noise hits both. BLAS is pinned to one thread
(set before numpy loads) so the comparison is about batching, not about BLAS threads.
Prints Markdown; bench/README.md records a run.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402  (the BLAS pin must precede numpy)
import platform  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from monitor.batching import DynamicBatcher, _Slot  # noqa: E402

THREADS = 32
CALLS_PER_THREAD = {256: 200, 1024: 16}  # MLP width -> calls per thread: about 1 s unbatched


def passthrough_stack(items: Sequence[Any]) -> Sequence[Any]:
    return items


def passthrough_unstack(output: Any, n: int) -> Sequence[Any]:
    return output


def noop_batcher(default_stack: bool, **kw: Any) -> DynamicBatcher:
    """A batcher whose batch function does nothing: what is left is the batcher's own cost."""
    if default_stack:
        return DynamicBatcher(lambda x: x, **kw)
    return DynamicBatcher(lambda x: x, stack=passthrough_stack, unstack=passthrough_unstack, **kw)


Cost = tuple[float, float]  # wall-clock and process CPU microseconds per item


def per_item(run: Callable[[], int]) -> Cost:
    """Wall and CPU (all threads of this process) microseconds per item of ``run()``.

    CPU time is the steadier figure on a shared machine: other jobs stretch wall time only.
    """
    w0, c0 = time.perf_counter(), time.process_time()
    n = run()
    return (time.perf_counter() - w0) / n * 1e6, (time.process_time() - c0) / n * 1e6


def call_loop(call: Callable[[Any], Any], item: Any, n: int) -> int:
    """``n`` blocking calls from one thread."""
    for _ in range(n):
        call(item)
    return n


def submit_all(batcher: DynamicBatcher, item: Any, n: int, chunk: int = 256) -> int:
    """One thread submits ``chunk`` items, waits for them all, and repeats to ``n`` items.

    Chunks keep a few hundred Futures alive, as an async server would; tens of thousands
    alive at once would make this a benchmark of the garbage collector.
    """
    for _ in range(n // chunk):
        futures: list[Future[Any]] = [batcher.submit(item) for _ in range(chunk)]
        for f in futures:
            f.result()
    return n // chunk * chunk


def threaded(call: Callable[[Any], Any], item: Any, per_thread: int) -> int:
    """THREADS threads each make ``per_thread`` blocking calls, released together."""
    start = threading.Barrier(THREADS)

    def worker() -> None:
        start.wait()
        for _ in range(per_thread):
            call(item)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return THREADS * per_thread


def dispatch_only(batcher: DynamicBatcher, item: Any, n: int) -> int:
    """The worker's share alone: hand ready batches of 32 to its dispatch, in this thread.

    Uses the batcher's private ``_dispatch`` and ``_Slot`` (what a blocking call waits on), so
    what remains is stacking, the batch call, unstacking and answering each caller.
    """
    for _ in range(n // 32):
        batcher._dispatch([(item, _Slot(), 0.0) for _ in range(32)])
    return n // 32 * 32


def median_cost(repeats: int, run: Callable[[], int]) -> Cost:
    costs = [per_item(run) for _ in range(repeats)]
    return statistics.median(c[0] for c in costs), statistics.median(c[1] for c in costs)


def overhead(n: int, repeats: int) -> str:
    """The batcher's own per-item cost, with a batch function that does nothing."""
    row = np.zeros(16, dtype=np.float32)
    wall, cpu = median_cost(repeats, lambda: call_loop(lambda x: x, row, n))
    lines = [
        "| path | stack/unstack | wall us per item | CPU us per item | mean batch |",
        "|---|---|---|---|---|",
        f"| direct call, no batcher | - | {wall:.2f} | {cpu:.2f} | - |",
    ]
    with ThreadPoolExecutor(1) as pool:  # the floor: one thread handoff, no batching at all

        def handoff(x: Any) -> Any:
            return pool.submit(passthrough_stack, x).result()

        for title, run in (
            ("1 thread, blocking call", lambda: call_loop(handoff, row, n // 4)),
            (f"{THREADS} threads, blocking calls", lambda: threaded(handoff, row, n // THREADS)),
        ):
            wall, cpu = median_cost(repeats, run)
            lines.append(
                f"| reference: ThreadPoolExecutor(1).submit().result(), {title} | - "
                f"| {wall:.2f} | {cpu:.2f} | - |"
            )
    for default in (False, True):
        label = "numpy (default)" if default else "pass-through"
        batcher = noop_batcher(default, max_batch_size=32)
        wall, cpu = median_cost(repeats, lambda b=batcher: dispatch_only(b, row, n))  # type: ignore[misc]
        batcher.close()
        lines.append(
            f"| worker only: dispatch ready batches of 32, no thread switch | {label} "
            f"| {wall:.2f} | {cpu:.2f} | 32.0 |"
        )
        for title, kw, measure in (
            ("1 thread, blocking call, max_delay_ms=0", {"max_delay_ms": 0.0},
             lambda b: call_loop(b, row, n // 4)),
            ("1 thread, submit 256 then wait, repeat", {"max_delay_ms": 1.0},
             lambda b: submit_all(b, row, n)),
            (f"{THREADS} threads, blocking calls", {"max_delay_ms": 1.0},
             lambda b: threaded(b, row, n // THREADS)),
        ):  # fmt: skip
            batcher = noop_batcher(default, max_batch_size=32, max_queue=n + 1, **kw)
            wall, cpu = median_cost(repeats, lambda b=batcher, m=measure: m(b))  # type: ignore[misc]
            batcher.close()
            mean = batcher.stats()["mean_batch_size"]
            lines.append(f"| {title} | {label} | {wall:.2f} | {cpu:.2f} | {mean:.1f} |")
    return "\n".join(lines)


def mlp(width: int, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A two-layer float32 MLP: ``width`` -> 4 * ``width`` -> ``width``, numpy matmuls."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(width, 4 * width)).astype(np.float32) / np.sqrt(width)
    w2 = rng.normal(size=(4 * width, width)).astype(np.float32) / np.sqrt(4 * width)

    def model(x: np.ndarray) -> np.ndarray:
        return np.asarray(np.maximum(x @ w1, 0.0) @ w2)

    return model


def throughput(calls: dict[int, int], repeats: int) -> str:
    """Items per second from THREADS callers: each calling the model alone vs through a batcher."""
    lines = [
        "| model (width) | unbatched items/s | batched items/s (max_batch_size 32, "
        "max_delay_ms 2) | speed-up | mean batch | model ms, batch 1 / batch 32 |",
        "|---|---|---|---|---|---|",
    ]
    lines += [compare(width, per_thread, repeats) for width, per_thread in calls.items()]
    return "\n".join(lines)


def compare(width: int, per_thread: int, repeats: int) -> str:
    """One table row: the MLP of ``width`` called unbatched and batched, runs alternating."""
    model = mlp(width)
    row = np.ones(width, dtype=np.float32)

    def one(x: np.ndarray) -> np.ndarray:
        return model(x[None, :])[0]

    batcher = DynamicBatcher(model, max_batch_size=32, max_delay_ms=2.0)
    plain, batched = [], []
    for _ in range(repeats):  # alternate so noise from other jobs hits both
        plain.append(1e6 / per_item(lambda: threaded(one, row, per_thread))[0])
        batched.append(1e6 / per_item(lambda: threaded(batcher, row, per_thread))[0])
    batcher.close()
    mean = batcher.stats()["mean_batch_size"]
    b1 = model_ms(model, np.ones((1, width), np.float32))
    b32 = model_ms(model, np.ones((32, width), np.float32))
    p, b = statistics.median(plain), statistics.median(batched)
    return (
        f"| MLP {width}-{4 * width}-{width} | {p:,.0f} | {b:,.0f} | x{b / p:.2f} "
        f"| {mean:.1f} | {b1:.3f} / {b32:.3f} |"
    )


def model_ms(model: Callable[[np.ndarray], np.ndarray], x: np.ndarray, n: int = 200) -> float:
    """Median ms per call of ``model(x)`` from one thread."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}; {os.cpu_count()} CPUs (nproc), {cpu}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and repeats")
    args = parser.parse_args(argv)
    n, repeats = (8_000, 3) if args.quick else (40_000, 5)
    scale = 2 if args.quick else 1
    calls = {width: per_thread // scale for width, per_thread in CALLS_PER_THREAD.items()}
    print(f"## Batching (bench/batching_micro.py{' --quick' if args.quick else ''})\n")
    print(f"{machine()}\n")
    for title, run in (
        ("Per-item overhead (batch function does nothing)", lambda: overhead(n, repeats)),
        (f"Throughput, {THREADS} caller threads", lambda: throughput(calls, repeats)),
    ):  # fmt: skip
        start = time.perf_counter()
        body = run()
        print(f"### {title} ({time.perf_counter() - start:.0f} s)\n\n{body}\n", flush=True)


if __name__ == "__main__":
    main()
