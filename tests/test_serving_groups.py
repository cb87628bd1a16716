"""Length groups as a serving knob: the search measures ``trim_group_rows``, a deployment of a
registered version runs its padded batches in groups of that many rows, and a bad value in a
config serves with the default (and says so in the log)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from monitor import Monitor
from monitor.settings import Settings
from monitor.storage import Database
from tuner import registry
from tuner.onnx_tools import load_session

SEQ = 12
MASK = "attention_mask"


def shape_revealing_onnx(path: Path) -> Path:
    """``sums``: each row's masked token-id sum (it respects the mask, so trimming keeps it);
    ``rows``: how many rows the session ran together, repeated on each row (what a caller sees
    of the batch it rode in)."""
    from onnx import TensorProto, helper

    from tests.serving_models import _save

    int64 = TensorProto.INT64
    nodes = [
        helper.make_node("Mul", ["input_ids", MASK], ["masked"]),
        helper.make_node("Cast", ["masked"], ["masked_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["masked_f", "axis1"], ["sums"], keepdims=1),
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Cast", ["batch"], ["batch_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["batch", "one"], ["column"], axis=0),
        helper.make_node("Expand", ["batch_f", "column"], ["rows"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rows",
        [helper.make_tensor_value_info(n, int64, ["N", "S"]) for n in ("input_ids", MASK)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1]) for n in ("sums", "rows")],
        [
            helper.make_tensor("axis1", int64, [1], [1]),
            helper.make_tensor("zero", int64, [1], [0]),
            helper.make_tensor("one", int64, [1], [1]),
        ],
    )
    return _save(graph, path)


def ragged_rows(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Single-row feeds of natural lengths 2..SEQ, each only as long as its sentence."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in rng.integers(2, SEQ + 1, n):
        ids = rng.integers(1, 100, (1, int(length))).astype(np.int64)
        rows.append({"input_ids": ids, MASK: np.ones_like(ids)})
    return rows


def serve(url: str, tmp_path: Path, config: dict[str, Any], rows: list[Any]) -> list[Any]:
    """Register the model with ``config``, deploy it and send every row at once."""
    path = shape_revealing_onnx(tmp_path / "rows.onnx")
    settings = Settings(database_url=url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(url)
    registry.register("rows", path, config=config, db=db, settings=settings)
    db.dispose()
    with Monitor(url, sample_rate=0.0) as mon:
        dep = mon.deployment("rows", poll_s=60)
        with ThreadPoolExecutor(len(rows)) as pool:  # one full batch: all callers at once
            outs = list(pool.map(dep, rows))
        stats = dep.batching_stats()["champion"]
        dep.close()
    assert stats["batches"] == 1 and stats["items"] == len(rows)
    session = load_session(path)
    for row, out in zip(rows, outs, strict=True):
        np.testing.assert_allclose(out[0], session.run(None, row)[0], rtol=1e-5, atol=1e-5)
    return outs


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The tiny BERT of tests/test_peers_candidates.py, exported, and 16 padded sentences."""
    pytest.importorskip("transformers")
    from tests.test_peers_candidates import MeanPooledBert, sentences
    from tuner.onnx_tools import export_onnx

    feeds = sentences(16, 8)
    axes = {name: {1: "sequence"} for name in feeds}
    path = export_onnx(MeanPooledBert().eval(), sentences(2, 0),
                       tmp_path_factory.mktemp("bert") / "bert.onnx",
                       output_names=["embedding"], dynamic_axes=axes)  # fmt: skip
    return path, feeds


# Eight callers fill one batch of 8; a delay no test reaches means only a full batch runs.
FULL_BATCH = {"batch_size": 8, "max_delay_ms": 600_000.0, "batch_workers": 1, "trim_padding": MASK}


def test_a_deployment_runs_its_padded_batch_in_groups_of_trim_group_rows(
    sqlite_url: str, tmp_path: Path
) -> None:
    outs = serve(sqlite_url, tmp_path, {**FULL_BATCH, "trim_group_rows": 2}, ragged_rows(8, 1))
    assert [float(out[1][0, 0]) for out in outs] == [2.0] * 8


def test_without_trim_group_rows_a_batch_of_8_runs_whole(sqlite_url: str, tmp_path: Path) -> None:
    outs = serve(sqlite_url, tmp_path, FULL_BATCH, ragged_rows(8, 2))
    assert [float(out[1][0, 0]) for out in outs] == [8.0] * 8


def test_with_two_threads_the_groups_of_a_batch_run_at_once_on_one_thread_each(
    sqlite_url: str, tmp_path: Path
) -> None:
    # A batch of 8 is one group of 8; with two tuned threads it runs as two groups of 4, at
    # once, each on a single-threaded run (ORT's intra-op threads share small groups badly).
    config = {**FULL_BATCH, "runtime": {"threads": 2}}
    outs = serve(sqlite_url, tmp_path, config, ragged_rows(8, 4))
    assert [float(out[1][0, 0]) for out in outs] == [4.0] * 8


def test_length_groups_answer_in_order_at_every_batch_size(tmp_path: Path) -> None:
    from monitor.batching import LengthGroups, pad_rows

    path = shape_revealing_onnx(tmp_path / "rows.onnx")
    opened: list[int] = []

    def open_session(threads: int) -> Any:
        opened.append(threads)
        return load_session(path)

    groups = LengthGroups(open_session, MASK, group_rows=4, threads=2)
    reference = load_session(path)
    for n in (1, 2, 3, 9, 17):
        rows = ragged_rows(n, 10 + n)
        outs = groups(pad_rows(rows, MASK))
        expected = np.concatenate([reference.run(None, r)[0] for r in rows])
        np.testing.assert_allclose(outs[0], expected, rtol=1e-6)
    # One single-threaded session for the groups; the two-thread one only for a lone row.
    assert opened == [1, 2]
    groups.close()


@pytest.mark.parametrize("bad", ["x", 0, True, 2.5])
def test_a_bad_trim_group_rows_serves_with_8_and_logs_the_value(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: object
) -> None:
    with caplog.at_level(logging.ERROR, logger="tunewatch.deploy"):
        outs = serve(sqlite_url, tmp_path, {**FULL_BATCH, "trim_group_rows": bad},
                     ragged_rows(8, 3))  # fmt: skip
    assert [float(out[1][0, 0]) for out in outs] == [8.0] * 8
    (line,) = [r.getMessage() for r in caplog.records if "trim_group_rows" in r.getMessage()]
    assert f"trim_group_rows={bad!r}" in line and "integer >= 1" in line


def test_serving_search_measures_every_group_size_and_the_best_config_carries_it(
    bert: tuple[Path, dict[str, np.ndarray]],
) -> None:
    from tuner.serving_search import search_serving
    from tuner.tuning import serving_defaults

    path, feeds = bert
    found = search_serving(path, feeds, slo_ms=10_000.0, mask=MASK, clients=4,
                           calls_per_client=2, batch_sizes=(4,), delays_ms=(2.0,),
                           group_rows=(2, 4, 8))  # fmt: skip
    groups = [p.group_rows for p in found.points]
    # The plan runs at groups of 8; only the best batched point is tried at 2 and 4.
    assert sorted(g for g in groups if g != 8) == [2, 4] and groups.count(8) == len(groups) - 2
    assert found.best is not None
    config = found.best.to_config()
    assert config["trim_group_rows"] in (2, 4, 8)
    assert f"length groups of {config['trim_group_rows']} rows" in found.reason
    # tuning.py registers the winner with the searched keys, the group size included.
    winner = SimpleNamespace(config={"runtime": {"threads": 1}, "serving": config})
    assert serving_defaults(winner, 10_000.0)["trim_group_rows"] == config["trim_group_rows"]
    # Without a mask (or without batching) there is nothing to group: no extra points, no key.
    plain = search_serving(path, feeds, slo_ms=10_000.0, clients=2, calls_per_client=1,
                           batch_sizes=(1, 4), delays_ms=(2.0,))  # fmt: skip
    assert all(p.group_rows == 0 for p in plain.points)
    assert plain.best is not None and "trim_group_rows" not in plain.best.to_config()


def test_the_search_judges_its_finalists_by_the_median_of_repeated_runs(
    bert: tuple[Path, dict[str, np.ndarray]],
) -> None:
    from tuner.errors import TunerError
    from tuner.serving_search import CONFIRM_TOP, search_serving

    path, feeds = bert
    found = search_serving(path, feeds, slo_ms=10_000.0, mask=MASK, clients=4,
                           calls_per_client=2, batch_sizes=(1, 4), delays_ms=(1.0, 2.0),
                           group_rows=(2, 4), confirm_rounds=2)  # fmt: skip
    finalists = min(CONFIRM_TOP, len(found.points))
    assert len(found.confirmations) == 2 * finalists
    assert found.best is not None and "(medians of 3 runs)" in found.reason
    runs = [p for p in (*found.points, *found.confirmations) if _same(p, found.best)]
    assert len(runs) == 3
    assert found.best.throughput == pytest.approx(float(np.median([p.throughput for p in runs])))
    assert found.to_dict()["confirmations"]
    with pytest.raises(TunerError, match="confirm_rounds=-1 not negative"):
        search_serving(path, feeds, slo_ms=1.0, mask=MASK, confirm_rounds=-1)


def _same(a: Any, b: Any) -> bool:
    keys = ("threads", "batch_workers", "max_batch_size", "max_delay_ms", "group_rows")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def test_closing_a_deployment_runs_its_queued_calls_in_groups_first(
    sqlite_url: str, tmp_path: Path
) -> None:
    import threading

    path = shape_revealing_onnx(tmp_path / "rows.onnx")
    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(sqlite_url)
    config = {**FULL_BATCH, "runtime": {"threads": 2}}  # groups at once, on a thread pool
    registry.register("rows", path, config=config, db=db, settings=settings)
    db.dispose()
    rows = ragged_rows(3, 9)  # fewer than a full batch: they wait for the 10-minute delay
    outs: list[Any] = [None] * len(rows)
    with Monitor(sqlite_url, sample_rate=0.0) as mon:
        dep = mon.deployment("rows", poll_s=60)

        def call(i: int) -> None:
            outs[i] = dep(rows[i])

        callers = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
        for t in callers:
            t.start()
        while dep.batching_stats()["champion"]["pending"] < len(rows):
            threading.Event().wait(0.005)
        dep.close()  # drains the queue: the calls run, in groups, before the pool stops
        for t in callers:
            t.join()
        stats = dep.batching_stats()["champion"]
    # One batch of three, as two groups at once (2 + 1 rows): not retried row by row.
    assert (stats["batches"], stats["retried_batches"], stats["errors"]) == (1, 0, 0)
    assert sorted(float(out[1][0, 0]) for out in outs) == [1.0, 2.0, 2.0]
    session = load_session(path)
    for row, out in zip(rows, outs, strict=True):
        np.testing.assert_allclose(out[0], session.run(None, row)[0], rtol=1e-5)
