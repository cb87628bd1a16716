"""OpenTelemetry wiring: sampled call spans go through the SDK into the database (and OTLP).

Spans are built on the writer thread from timings the hot path already took, with the caller's
span as parent, so tracing adds no work to the model call itself. A span exporter hands finished
spans to the writer, which owns retries; an OTLP exporter is added when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` variable is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Status, StatusCode

SPAN_NAME = "tunewatch.call"
# The payload slot of a sampled call whose key had already spent this minute's sample cap.
CAPPED = ("capped",)
CANCELLED = "cancelled"  # the error slot of a cancelled await: a span, no latency, no error


class RowSink(Protocol):
    """Where span rows go: the writer's queue."""

    def append(self, row: dict[str, Any], /) -> None: ...


class DatabaseSpanExporter(SpanExporter):
    """Hands finished spans to the writer's queue; the writer batches, retries and counts drops."""

    def __init__(self, sink: RowSink) -> None:
        self._sink = sink

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Convert spans to rows and queue them (never blocks on I/O)."""
        for span in spans:
            row = span_row(span)
            if row is not None:
                self._sink.append(row)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the writer owns the database."""


def span_row(span: ReadableSpan) -> dict[str, Any] | None:
    """The ``spans`` table row for a tunewatch call span (None for foreign spans)."""
    attrs = dict(span.attributes or {})
    if "tunewatch.model" not in attrs or span.start_time is None or span.end_time is None:
        return None
    ctx = span.get_span_context()
    parent = span.parent
    error = attrs.get("error.type")
    status = attrs.pop("tunewatch.status", None)
    return {
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_span_id": f"{parent.span_id:016x}" if parent else None,
        "name": span.name,
        "model": str(attrs["tunewatch.model"]),
        "version": str(attrs.get("tunewatch.version", "")),
        "arm": str(attrs.get("tunewatch.arm", "main")),
        "start_time": datetime.fromtimestamp(span.start_time / 1e9, timezone.utc),
        "duration_ms": (span.end_time - span.start_time) / 1e6,
        "batch_size": int(attrs.get("tunewatch.batch_size", 1)),  # type: ignore[arg-type]
        "status": str(status) if status else "error" if error else "ok",
        "error_type": str(error) if error else None,
        "source": "call",
        "attributes": {k: v for k, v in attrs.items() if isinstance(v, (str, int, float, bool))},
    }


def build_tracer_provider(
    sink: RowSink, extra_exporters: Iterable[SpanExporter] = ()
) -> TracerProvider:
    """A tracer provider of our own (the application's global provider is left alone)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "tunewatch"}))
    provider.add_span_processor(SimpleSpanProcessor(DatabaseSpanExporter(sink)))
    for exporter in extra_exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def emit_span(
    tracer: trace.Tracer,
    parent: Any,
    attributes: dict[str, Any],
    start_ns: int,
    duration_ns: int,
    error: str | None,
) -> None:
    """Record one finished call as a span with explicit start and end times."""
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    span = tracer.start_span(SPAN_NAME, context=ctx, start_time=start_ns, attributes=attributes)
    if error == CANCELLED:
        span.set_attribute("tunewatch.status", CANCELLED)
    elif error is not None:
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=start_ns + duration_ns)


def current_parent() -> Any:
    """The caller's active span, or None when there is no valid one (cheap)."""
    span = trace.get_current_span()
    return span if span.get_span_context().is_valid else None


def build_meter_provider(
    observe: Any, extra_readers: Iterable[MetricReader] = ()
) -> MeterProvider | None:
    """Metrics: calls, errors and dropped telemetry, as observable counters.

    Built only when a reader is given or an OTLP endpoint is configured; ``observe`` returns
    ``(calls_by_attributes, errors_by_attributes, drops_by_reason)`` on each collection.
    """
    readers = list(extra_readers)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if not readers:
        return None
    provider = MeterProvider(
        metric_readers=readers, resource=Resource.create({"service.name": "tunewatch"})
    )
    meter = provider.get_meter("tunewatch")

    def calls(_o: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, a) for a, v in observe()[0]]

    def errors(_o: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, a) for a, v in observe()[1]]

    def drops(_o: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"reason": r}) for r, v in observe()[2].items()]

    meter.create_observable_counter("tunewatch.calls", [calls], unit="{call}")
    meter.create_observable_counter("tunewatch.errors", [errors], unit="{call}")
    meter.create_observable_counter("tunewatch.telemetry.dropped", [drops], unit="{record}")
    return provider
