"""DynamicBatcher with real threads: each caller gets its own result, error, or refusal."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from monitor.batching import BatcherClosed, DynamicBatcher, Overloaded, unstack_rows
from monitor.errors import ConfigError, MonitorError
from tests.serving_models import tiny_onnx

NEVER_MS = 60_000.0  # a delay no test waits out: batches go when full or on close


def _in_threads(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """Call ``fn(item)`` from one thread per item; each slot holds a result or an exception."""
    out: list[Any] = [None] * len(items)

    def call(i: int) -> None:
        try:
            out[i] = fn(items[i])
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def _gated(
    fn: Callable[[Any], Any],
) -> tuple[Callable[[Any], Any], threading.Event, threading.Event]:
    """``fn`` that signals it started and then waits for a release: holds the worker busy."""
    started, release = threading.Event(), threading.Event()

    def run(x: Any) -> Any:
        started.set()
        release.wait(30)
        return fn(x)

    return run, started, release


def test_32_concurrent_callers_each_get_their_own_row() -> None:
    sizes: list[int] = []

    def model(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return x * 2.0 + 1.0

    rows = [np.full(3, float(i)) for i in range(32)]
    with DynamicBatcher(model, max_batch_size=32, max_delay_ms=NEVER_MS) as batcher:
        results = _in_threads(batcher, rows)
    assert sizes == [32]  # one full batch, dispatched without waiting out the delay
    for i, result in enumerate(results):
        assert np.array_equal(result, np.full(3, 2.0 * i + 1.0))
    stats = batcher.stats()
    assert (stats["batches"], stats["items"], stats["mean_batch_size"]) == (1, 32, 32.0)


def test_onnx_session_feeds_are_batched_and_outputs_split(tmp_path: object) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(tiny_onnx(f"{tmp_path}/tiny.onnx"))
    rows = np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32)
    feeds = [{"x": row} for row in rows]
    with DynamicBatcher(lambda feed: sess.run(None, feed), max_batch_size=8,
                        max_delay_ms=NEVER_MS) as batcher:  # fmt: skip
        results = _in_threads(batcher, feeds)
    expected = sess.run(None, {"x": rows})[0]
    for i, result in enumerate(results):
        assert isinstance(result, list) and len(result) == 1  # one row per ORT output
        np.testing.assert_allclose(result[0], expected[i], rtol=1e-6)
    assert batcher.stats()["mean_batch_size"] == 8.0


def _rejects_negative(x: np.ndarray) -> np.ndarray:
    if (x < 0).any():
        raise ValueError(f"negative input {x.min()}")
    return x * 10.0


def test_a_failed_batch_is_retried_so_each_caller_gets_its_own_outcome() -> None:
    rows = [np.array([float(i) if i % 3 else -float(i + 1)]) for i in range(8)]
    with DynamicBatcher(_rejects_negative, max_batch_size=8, max_delay_ms=NEVER_MS) as batcher:
        results = _in_threads(batcher, rows)
    for i, result in enumerate(results):
        if i % 3:
            assert np.array_equal(result, np.array([10.0 * i]))
        else:
            assert isinstance(result, ValueError)
            assert str(result) == f"negative input {-float(i + 1)}"  # its own error, not a peer's
    stats = batcher.stats()
    assert (stats["batches"], stats["retried_batches"], stats["errors"]) == (1 + 8, 1, 3)


def test_without_isolation_every_caller_of_a_failed_batch_gets_the_error() -> None:
    rows = [np.array([1.0]), np.array([-1.0]), np.array([2.0]), np.array([3.0])]
    with DynamicBatcher(_rejects_negative, max_batch_size=4, max_delay_ms=NEVER_MS,
                        isolate_errors=False) as batcher:  # fmt: skip
        results = _in_threads(batcher, rows)
    assert all(isinstance(r, ValueError) and "negative input" in str(r) for r in results)
    assert batcher.stats()["batches"] == 1


def test_an_item_of_another_shape_runs_alone_and_never_fails_its_peers() -> None:
    weights = np.ones((4, 2))
    rows: list[np.ndarray] = [np.full(4, float(i)) for i in range(5)]
    rows.insert(2, np.ones(5))  # cannot be multiplied by a 4 x 2 matrix
    with DynamicBatcher(lambda x: x @ weights, max_batch_size=6,
                        max_delay_ms=NEVER_MS) as batcher:  # fmt: skip
        results = _in_threads(batcher, rows)
    assert isinstance(results[2], ValueError)
    good = [r for i, r in enumerate(results) if i != 2]
    assert [r.tolist() for r in good] == [[4.0 * i, 4.0 * i] for i in range(5)]

    with DynamicBatcher(lambda x: x.sum(axis=1), max_batch_size=3,
                        max_delay_ms=NEVER_MS) as width_free:  # fmt: skip
        sums = _in_threads(width_free, [np.ones(2), np.ones(7), np.ones(2)])
    assert [float(s) for s in sums] == [2.0, 7.0, 2.0]
    assert width_free.stats()["batches"] == 2  # the (7,) row in a batch of its own


def test_a_custom_stack_that_refuses_an_item_falls_back_to_single_runs() -> None:
    def stack(items: Sequence[list[float]]) -> np.ndarray:
        return np.array(items, dtype=float)  # ragged lists raise ValueError

    items = [[1.0, 2.0], [3.0], [4.0, 5.0], [object()]]
    with DynamicBatcher(lambda x: x.sum(axis=1), stack=stack, max_batch_size=4,
                        max_delay_ms=NEVER_MS, isolate_errors=False) as batcher:  # fmt: skip
        sums = _in_threads(batcher, items)
    assert [float(s) for s in sums[:3]] == [3.0, 3.0, 9.0]
    assert isinstance(sums[3], TypeError)  # float(object()): fails alone
    assert batcher.stats()["batches"] == 2  # the two length-2 rows still shared a batch


def test_a_concatenating_stack_batches_feeds_of_each_sequence_length_together() -> None:
    sizes: list[int] = []

    def model(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        sizes.append(len(feed["ids"]))
        return [feed["ids"].sum(axis=1)]

    def concat(items: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {"ids": np.concatenate([item["ids"] for item in items])}

    def split(outputs: list[np.ndarray], n: int) -> list[float]:
        return [float(outputs[0][i]) for i in range(n)]

    feeds = [{"ids": np.ones((1, 3 if i % 2 else 5))} for i in range(6)]
    with DynamicBatcher(model, stack=concat, unstack=split, max_batch_size=6,
                        max_delay_ms=NEVER_MS) as batcher:  # fmt: skip
        results = _in_threads(batcher, feeds)
    assert results == [5.0, 3.0] * 3
    assert sorted(sizes) == [3, 3]  # not six single runs


def test_dict_and_tuple_outputs_are_split_per_item() -> None:
    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"score": x.sum(axis=1), "double": 2 * x}

    with DynamicBatcher(model, max_batch_size=2, max_delay_ms=NEVER_MS) as batcher:
        a, b = _in_threads(batcher, [np.ones(2), np.zeros(2)])
    assert float(a["score"]) == 2.0 and b["double"].tolist() == [0.0, 0.0]
    pair = unstack_rows((np.arange(4).reshape(2, 2), np.arange(2)), 2)
    assert isinstance(pair[1], tuple) and pair[1][0].tolist() == [2, 3] and pair[1][1] == 1
    assert unstack_rows(["cat", "dog"], 2) == ["cat", "dog"]


def test_an_output_that_cannot_be_split_names_the_fix() -> None:
    with DynamicBatcher(lambda x: float(x.sum()), max_batch_size=2,
                        max_delay_ms=NEVER_MS) as batcher:  # fmt: skip
        results = _in_threads(batcher, [np.ones(2), np.ones(2)])
    for r in results:
        assert isinstance(r, ValueError) and "pass unstack=" in str(r)


def test_close_drains_pending_items_then_refuses_new_ones() -> None:
    batcher = DynamicBatcher(lambda x: x + 1, max_batch_size=100, max_delay_ms=NEVER_MS)
    futures = [batcher.submit(np.array([i])) for i in range(5)]
    batcher.close()
    assert [int(f.result(timeout=0)[0]) for f in futures] == [1, 2, 3, 4, 5]
    assert batcher.closed
    with pytest.raises(BatcherClosed, match="closed"):
        batcher(np.array([1]))
    with pytest.raises(RuntimeError):
        batcher.submit(np.array([1]))
    batcher.close()  # closing twice is harmless


def test_a_full_queue_raises_overloaded_instead_of_blocking() -> None:
    run, started, release = _gated(lambda x: x)
    batcher = DynamicBatcher(run, max_batch_size=1, max_delay_ms=0, max_queue=2)
    first = batcher.submit(np.array([0]))
    assert started.wait(30)  # the worker holds item 0; the queue is empty again
    queued = [batcher.submit(np.array([1])), batcher.submit(np.array([2]))]
    with pytest.raises(Overloaded, match="max_queue=2") as info:
        batcher.submit(np.array([3]))
    assert isinstance(info.value, MonitorError)
    release.set()
    assert [int(f.result(30)[0]) for f in [first, *queued]] == [0, 1, 2]
    batcher.close()
    assert batcher.stats()["rejected"] == 1


def test_a_cancelled_future_is_skipped_and_a_timeout_leaves_the_item_queued() -> None:
    calls: list[list[int]] = []

    def record(x: np.ndarray) -> np.ndarray:
        calls.append(x.ravel().tolist())
        return x

    run, started, release = _gated(record)
    batcher = DynamicBatcher(run, max_batch_size=1, max_delay_ms=0)
    batcher.submit(np.array([0]))
    assert started.wait(30)
    cancelled: Future[Any] = batcher.submit(np.array([1]))
    assert cancelled.cancel()
    with pytest.raises(TimeoutError, match="still queued"):
        batcher(np.array([2]), timeout=0.01)
    release.set()
    batcher.close()
    assert calls == [[0], [2]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch_size": 0}, "max_batch_size=0"),
        ({"max_batch_size": 2.5}, "max_batch_size=2.5"),
        ({"max_delay_ms": -1.0}, "max_delay_ms=-1.0"),
        ({"max_delay_ms": float("nan")}, "max_delay_ms=nan"),
        ({"max_queue": 0}, "max_queue=0"),
        ({"workers": 0}, "workers=0"),
        ({"workers": True}, "workers=True"),
    ],
)
def test_invalid_settings_raise_config_error_naming_the_value(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        DynamicBatcher(lambda x: x, **kwargs)


def test_a_non_callable_batch_fn_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not callable"):
        DynamicBatcher("model")  # type: ignore[arg-type]


def test_many_submitters_through_an_executor_all_complete() -> None:
    batcher = DynamicBatcher(lambda x: -x, max_batch_size=16, max_delay_ms=1.0)
    with batcher, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(batcher, [np.array([i]) for i in range(400)]))
    assert [int(r[0]) for r in results] == [-i for i in range(400)]
    assert batcher.stats()["items"] == 400


def test_two_workers_run_two_batches_at_once() -> None:
    # Each batch waits at a barrier for a second batch: only two concurrent batches pass it.
    both = threading.Barrier(2, timeout=30)

    def model(x: np.ndarray) -> np.ndarray:
        both.wait()
        return x * 10

    with DynamicBatcher(model, max_batch_size=2, max_delay_ms=NEVER_MS, workers=2) as batcher:
        results = _in_threads(batcher, [np.array([i]) for i in range(4)])
    assert [int(r[0]) for r in results] == [0, 10, 20, 30]  # each caller its own row
    stats = batcher.stats()
    assert (stats["workers"], stats["batches"], stats["items"], stats["errors"]) == (2, 2, 4, 0)


def test_several_workers_answer_every_caller_and_count_exactly() -> None:
    batcher = DynamicBatcher(lambda x: -x, max_batch_size=8, max_delay_ms=0.5, workers=3)
    with batcher, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher, [np.array([i]) for i in range(2000)]))
    assert [int(r[0]) for r in results] == [-i for i in range(2000)]
    stats = batcher.stats()
    assert stats["items"] == 2000 and stats["pending"] == 0
    assert stats["batches"] * stats["mean_batch_size"] == pytest.approx(2000)
    alive = [t for t in threading.enumerate() if t.name.startswith("tunewatch-batcher-")]
    assert alive == []  # close() joined every worker


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_worker() -> None:
    with DynamicBatcher(lambda x: x + 1, max_batch_size=4, max_delay_ms=0) as batcher:
        assert int(batcher(np.array([1]))[0]) == 2
        pid = os.fork()
        if pid == 0:  # child: the parent's worker thread does not exist here
            code = 1
            try:
                code = 0 if int(batcher(np.array([41]), timeout=10)[0]) == 42 else 2
            finally:
                os._exit(code)  # never return into pytest from the child
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert int(batcher(np.array([2]))[0]) == 3
