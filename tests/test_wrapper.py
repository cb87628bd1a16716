"""The wrapper as users see it: same results, same exceptions, and the rows it writes."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from monitor import ConfigError, Monitor, storage
from monitor.status import summarize
from tests.serving_models import tiny_onnx


def _summary(mon: Monitor, model: str) -> dict[str, object]:
    mon.flush()
    status = summarize(mon.db, model=model, window=timedelta(days=3650))
    (row,) = [m for m in status.models if m.model == model]
    return row.__dict__


def test_callable_returns_exactly_what_the_model_returns(db_url: str) -> None:
    marker = object()
    with Monitor(db_url) as mon:
        wrapped = mon.wrap(lambda x, *, k=None: (x, k, marker), name="f", version="v1")
        assert wrapped(np.ones(3), k=4)[2] is marker
        for _ in range(9):
            wrapped([1, 2])
        row = _summary(mon, "f")
    assert row["calls"] == 10
    assert row["items"] == 3 + 9 * 2  # batch size = first dimension of the first input
    assert row["errors"] == 0 and row["p50_ms"] is not None


def test_model_exception_propagates_unchanged_and_is_recorded(db_url: str) -> None:
    boom = ZeroDivisionError("model failed")

    def model(x: object) -> object:
        raise boom

    with Monitor(db_url) as mon:
        wrapped = mon.wrap(model, name="bad", version="v2")
        with pytest.raises(ZeroDivisionError) as info:
            wrapped(1)
        assert info.value is boom
        wrapped_ok = mon.wrap(lambda x: x, name="bad", version="v2")
        wrapped_ok(1)
        row = _summary(mon, "bad")
        aggs = storage.read_aggregates(mon.db, "bad")
    assert row["calls"] == 2 and row["errors"] == 1 and row["error_rate"] == 0.5
    assert aggs[0].model == "bad"


def test_decorator_form_keeps_the_function_name(sqlite_url: str) -> None:
    with Monitor(sqlite_url) as mon:

        @mon.instrument(name="scorer", version="v3")
        def score(x: float) -> float:
            """Double it."""
            return 2 * x

        assert score(2.5) == 5.0
        assert score.__name__ == "score" and score.__doc__ == "Double it."
        assert _summary(mon, "scorer")["calls"] == 1


def test_torch_module_runs_under_inference_mode(sqlite_url: str) -> None:
    import torch

    seen: list[bool] = []

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: object) -> object:
            seen.append(torch.is_inference_mode_enabled())
            return self.fc(x)

    net = Net()
    x = torch.randn(5, 4)
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        wrapped = mon.wrap(net, name="net", version="v1")
        out = wrapped(x)
        assert torch.equal(out, net.fc(x).detach())
        assert seen == [True] and wrapped.fc is net.fc
        mon.flush()
        samples = storage.read_samples(mon.db, "net", with_raw=True)
    assert len(samples) == 5
    assert samples[0].input_kind == "tabular" and set(samples[0].features) == {
        "x0",
        "x1",
        "x2",
        "x3",
    }
    assert set(samples[0].outputs or {}) == {"top_class", "confidence", "probs"}
    raw = samples[0].raw or {}
    assert np.allclose(raw["arg0"], x[0].numpy())


def test_onnx_session_keeps_run_and_accepts_a_feed(tmp_path: object, sqlite_url: str) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(tiny_onnx(f"{tmp_path}/tiny.onnx"))
    feed = {"x": np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)}
    expected = sess.run(None, feed)
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        wrapped = mon.wrap(sess, name="tiny", version="v1")
        assert np.array_equal(wrapped.run(None, feed)[0], expected[0])
        assert np.array_equal(wrapped(feed)[0], expected[0])
        assert wrapped.get_inputs()[0].name == "x"
        with pytest.raises(Exception, match="x"):  # ORT's own error for a missing input
            wrapped.run(None, {"nope": feed["x"]})
        row = _summary(mon, "tiny")
        raw = storage.read_samples(mon.db, "tiny", with_raw=True)[0].raw
    assert row["calls"] == 3 and row["errors"] == 1 and row["items"] == 6 + 6 + 6
    assert raw is not None and raw["x"].shape == (4,)


def test_tabular_and_tensor_inputs_become_features(sqlite_url: str) -> None:
    frame = pd.DataFrame({"age": [30.0, 41.0], "city": ["Oslo", "Lima"]})
    images = np.random.default_rng(1).normal(size=(3, 1, 8, 8)).astype(np.float32)
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        mon.wrap(lambda df: np.array([0.1, 0.9]), name="tab", version="v1")(frame)
        mon.wrap(lambda x: np.ones((3, 256)), name="img", version="v1")(images)
        mon.flush()
        tab = storage.read_samples(mon.db, "tab")
        img = storage.read_samples(mon.db, "img", with_raw=True)
    assert [s.features for s in tab] == [
        {"age": 30.0, "city": "Oslo"},
        {"age": 41.0, "city": "Lima"},
    ]
    assert [s.outputs for s in tab] == [{"value": 0.1}, {"value": 0.9}]
    assert img[0].input_kind == "tensor"
    assert img[0].features["max"] == pytest.approx(float(images[0].max()), rel=1e-6)
    assert img[0].features["l2"] == pytest.approx(float(np.linalg.norm(images[0])), rel=1e-5)
    assert img[0].outputs == {"norm": pytest.approx(16.0)}  # 256-wide rows: an embedding
    assert img[0].raw is not None and img[0].raw["arg0"].shape == (1, 8, 8)


def test_samples_respect_the_per_minute_cap(sqlite_url: str) -> None:
    with Monitor(sqlite_url, sample_rate=1.0, sample_cap_per_minute=7) as mon:
        wrapped = mon.wrap(lambda x: x, name="capped", version="v1")
        for _ in range(5):
            wrapped(np.zeros((3, 2)))
        row = _summary(mon, "capped")
    # A call can straddle a minute boundary, so allow one extra minute's worth.
    assert row["samples"] in (7, 14) and row["calls"] == 5


def test_spans_go_through_the_otel_sdk_with_the_callers_parent(sqlite_url: str) -> None:
    memory = InMemorySpanExporter()
    app_tracer = TracerProvider().get_tracer("app")
    with Monitor(sqlite_url, span_sample_rate=1.0, span_exporters=[memory]) as mon:
        wrapped = mon.wrap(lambda x: x, name="traced", version="v1")
        with app_tracer.start_as_current_span("request") as parent:
            wrapped(1)
        wrapped(2)
        mon.flush()
        from sqlalchemy import select

        from monitor import schema

        with mon.db.session() as s:
            rows = s.scalars(select(schema.CallSpan).order_by(schema.CallSpan.id)).all()
            spans = [(r.trace_id, r.parent_span_id, r.model, r.duration_ms) for r in rows]
    assert len(spans) == 2 and len(memory.get_finished_spans()) == 2
    ctx = parent.get_span_context()
    assert spans[0][0] == f"{ctx.trace_id:032x}" and spans[0][1] == f"{ctx.span_id:016x}"
    assert spans[1][1] is None and all(s[2] == "traced" and s[3] >= 0 for s in spans)
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_concurrent_threads_record_exact_counts(db_url: str) -> None:
    with Monitor(db_url) as mon:
        wrapped = mon.wrap(lambda x: x, name="threads", version="v1")

        def work() -> None:
            for _ in range(2500):
                wrapped(1)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row = _summary(mon, "threads")
        assert mon.dropped == 0
    assert row["calls"] == 8 * 2500


def test_log_backfills_rows_latencies_and_times(db_url: str) -> None:
    t0 = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)
    times = [t0 + timedelta(seconds=30 * i) for i in range(4)]
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0, 1.0, 0.0, 1.0]})
    with Monitor(db_url) as mon:
        n = mon.log(
            name="bf",
            version="v1",
            inputs=frame,
            outputs=np.array([0, 1, 1, 0]),
            latency_ms=[5.0, 6.0, 7.0, 8.0],
            timestamps=times,
        )
        mon.flush()
        samples = storage.read_samples(mon.db, "bf", "v1")
        lat = storage.read_call_latencies(mon.db, "bf", "v1", start=t0, end=t0 + timedelta(hours=1))
        aggs = storage.read_aggregates(mon.db, "bf", start=t0, end=t0 + timedelta(hours=1))
        seen = storage.versions_seen(mon.db, "bf")
    assert n == 4
    assert [s.ts for s in samples] == times and samples[2].features == {"a": 3.0, "b": 0.0}
    assert sorted(lat.tolist()) == [5.0, 6.0, 7.0, 8.0]
    assert sum(a.calls for a in aggs) == 4 and aggs[0].interval_start == t0
    assert seen[0].first_seen_at == times[0] and seen[0].last_seen_at == times[-1]


def test_log_rejects_mismatched_lengths_naming_them(sqlite_url: str) -> None:
    with Monitor(sqlite_url) as mon:
        with pytest.raises(ValueError, match="timestamps has 2 entries but inputs has 3 rows"):
            mon.log(name="m", inputs=np.zeros((3, 2)), timestamps=[datetime.now()] * 2)
        with pytest.raises(ValueError, match="latency_ms has 2 values"):
            mon.log(name="m", inputs=np.zeros((3, 2)), latency_ms=[1.0, 2.0])
        with pytest.raises(ValueError, match="'yesterday'"):
            mon.log(name="m", inputs=np.zeros((1, 2)), timestamps="yesterday")


def test_bad_arguments_name_the_value(sqlite_url: str) -> None:
    with Monitor(sqlite_url) as mon:
        with pytest.raises(TypeError, match="type int"):
            mon.wrap(42, name="x")
        with pytest.raises(ConfigError, match="output_kind='pixels'"):
            mon.wrap(abs, name="y", output_kind="pixels")
    with pytest.raises(ConfigError, match="sample_rate=1.5"):
        Monitor(sqlite_url, sample_rate=1.5)
    with pytest.raises(ConfigError, match="queue_size='many'"):
        Monitor(sqlite_url, queue_size="many")


def test_an_input_that_breaks_monitoring_never_breaks_the_call(sqlite_url: str) -> None:
    class Odd:
        @property
        def shape(self) -> tuple[int, ...]:
            raise RuntimeError("no shape today")

    with Monitor(sqlite_url) as mon:
        wrapped = mon.wrap(lambda x: "ok", name="odd", version="v1")
        assert wrapped(Odd()) == "ok"
        mon.flush()
        assert storage.counters(mon.db)["dropped_internal_error"] == 1


def test_torch_methods_that_return_the_module_return_the_wrapper(sqlite_url: str) -> None:
    import torch

    net = torch.nn.Linear(4, 3)
    with Monitor(sqlite_url) as mon:
        wrapped = mon.wrap(net, name="proxied", version="v1").eval()
        chained = wrapped.to("cpu").cpu().float().train(False).requires_grad_(False)
        assert chained is wrapped and wrapped.half() is wrapped and wrapped.float() is wrapped
        assert not net.training and not net.weight.requires_grad  # the module itself changed
        assert wrapped.parameters is not None and wrapped.state_dict().keys() == {"weight", "bias"}
        for _ in range(3):
            chained(torch.randn(2, 4))
        row = _summary(mon, "proxied")
    assert row["calls"] == 3  # telemetry kept working after .eval() and .to()


class _CountedCopies:
    """An array-like input that counts how often something reads its values."""

    reads = 0

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        _CountedCopies.reads += 1
        return np.zeros((4, 2))


def test_a_spent_sample_cap_copies_nothing_on_the_call_path(sqlite_url: str) -> None:
    import time

    for _ in range(3):  # a minute boundary between the calls gives a fresh cap: try again
        minute = time.time() // 60
        with Monitor(sqlite_url, sample_rate=1.0, sample_cap_per_minute=4) as mon:
            wrapped = mon.wrap(lambda x: 1, name=f"spent{int(minute)}", version="v1")
            wrapped(np.zeros((4, 2)))  # four rows: the minute's cap is spent
            mon.flush()
            _CountedCopies.reads = 0
            for _ in range(10):
                assert wrapped(_CountedCopies()) == 1
            mon.flush()
            status = summarize(mon.db, model=f"spent{int(minute)}", window=timedelta(days=1))
        if time.time() // 60 == minute:
            break
    assert _CountedCopies.reads == 0  # sampled, but nothing was copied
    (row,) = status.models
    assert row.calls == 11 and row.samples == 4
    assert status.samples_capped >= 10  # each capped call is still counted
