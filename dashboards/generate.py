"""Generate tunewatch's Grafana dashboards (``dashboards/json/*.json``) from one place.

Run ``python dashboards/generate.py`` after editing a query; ``--check`` exits 1 when the
committed JSON is out of date (the tests run the same comparison). Every panel reads the
tunewatch tables through the provisioned PostgreSQL datasource with Grafana's SQL macros only
(``$__timeFilter``, ``$__timeGroupAlias``, ``$__timeFrom()``...) and the ``$model`` /
``$version`` template variables, which Grafana quotes itself: no query is built from input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "grafana-postgresql-datasource", "uid": "tunewatch-pg"}
SCHEMA_VERSION = 39  # Grafana 11.x
OUT_DIR = Path(__file__).resolve().parent / "json"
TAGS = ["tunewatch"]

# The DDSketch mapping of monitor/sketch.py: bucket i holds (GAMMA^(i-1), GAMMA^i] ms and is
# reported as 2 * GAMMA^i / (GAMMA + 1). float8 arithmetic matches Python's floats exactly.
GAMMA = "(1.01::float8 / 0.99::float8)"
BUCKET_MS = f"2 * power({GAMMA}, bucket) / ({GAMMA} + 1)"
SERIES = "concat(a.model, ':', a.version, ' [', a.arm, ']')"
LIVE_EXPERIMENT_IN_RANGE = (
    "e.started_at <= $__timeTo() AND coalesce(e.ended_at, now()) >= $__timeFrom()"
)

# --- queries ----------------------------------------------------------------------------

MODEL_VARIABLE_SQL = """\
SELECT model FROM model_versions_seen
UNION
SELECT name FROM registered_models
ORDER BY 1"""

VERSION_VARIABLE_SQL = """\
SELECT version FROM model_versions_seen WHERE model IN ($model)
UNION
SELECT version FROM model_versions WHERE model IN ($model)
ORDER BY 1"""

CALLS_PER_S_SQL = """\
SELECT
  $__timeGroupAlias(a.interval_start, $__interval),
  concat(a.model, ':', a.version, ' [', a.arm, ']') AS metric,
  -- a group shorter than one stored interval still spans that whole interval
  sum(a.calls) / greatest($__interval_ms / 1000.0, max(a.interval_s)) AS calls_per_s
FROM latency_aggregates AS a
WHERE $__timeFilter(a.interval_start)
  AND a.model IN ($model)
  AND a.version IN ($version)
GROUP BY 1, 2
ORDER BY 1, 2"""

ERROR_RATE_SQL = """\
SELECT
  $__timeGroupAlias(a.interval_start, $__interval),
  concat(a.model, ':', a.version, ' [', a.arm, ']') AS metric,
  sum(a.errors)::float8 / nullif(sum(a.calls), 0) AS error_rate
FROM latency_aggregates AS a
WHERE $__timeFilter(a.interval_start)
  AND a.model IN ($model)
  AND a.version IN ($version)
GROUP BY 1, 2
ORDER BY 1, 2"""

SAMPLES_SQL = """\
SELECT
  $__timeGroupAlias(s.ts, $__interval),
  concat(s.model, ':', s.version, ' [', s.arm, ']') AS metric,
  count(s.id) AS samples
FROM samples AS s
WHERE $__timeFilter(s.ts)
  AND s.model IN ($model)
  AND s.version IN ($version)
GROUP BY 1, 2
ORDER BY 1, 2"""

TOTAL_CALLS_SQL = """\
SELECT sum(a.calls) AS calls
FROM latency_aggregates AS a
WHERE $__timeFilter(a.interval_start)
  AND a.model IN ($model)
  AND a.version IN ($version)"""

TOTAL_ERROR_RATE_SQL = """\
SELECT sum(a.errors)::float8 / nullif(sum(a.calls), 0) AS error_rate
FROM latency_aggregates AS a
WHERE $__timeFilter(a.interval_start)
  AND a.model IN ($model)
  AND a.version IN ($version)"""

TOTAL_SAMPLES_SQL = """\
SELECT count(s.id) AS samples
FROM samples AS s
WHERE $__timeFilter(s.ts)
  AND s.model IN ($model)
  AND s.version IN ($version)"""

# Counters are cumulative per process, so the latest value of each process is its total.
TOTAL_DROPS_SQL = """\
SELECT sum(c.value) AS dropped
FROM telemetry_counters AS c
WHERE starts_with(c.name, 'dropped_')
  AND $__timeFilter(c.updated_at)"""

DROPS_TABLE_SQL = """\
SELECT
  substr(c.name, length('dropped_') + 1) AS reason,
  c.host,
  count(DISTINCT c.instance_id) AS processes,
  sum(c.value) AS dropped,
  max(c.updated_at) AS "last report"
FROM telemetry_counters AS c
WHERE starts_with(c.name, 'dropped_')
  AND $__timeFilter(c.updated_at)
GROUP BY 1, 2
ORDER BY dropped DESC, reason"""

DRIFT_SCORE_SQL = """\
SELECT
  $__timeGroupAlias(c.created_at, $__interval),
  concat(c.model, ':', c.version, ' ', r.target, '.', c.column_name, ' (', c.method, ')')
    AS metric,
  avg(c.score) AS score
FROM drift_columns AS c
JOIN drift_reports AS r ON r.id = c.report_id
WHERE $__timeFilter(c.created_at)
  AND c.model IN ($model)
  AND c.version IN ($version)
  AND c.score IS NOT NULL
GROUP BY 1, 2
ORDER BY 1, 2"""

DRIFT_SHARE_SQL = """\
SELECT
  $__timeGroupAlias(r.created_at, $__interval),
  concat(r.model, ':', r.version, ' ', r.target) AS metric,
  max(r.share_drifted) AS share_drifted
FROM drift_reports AS r
WHERE $__timeFilter(r.created_at)
  AND r.model IN ($model)
  AND r.version IN ($version)
  AND r.status = 'ok'
GROUP BY 1, 2
ORDER BY 1, 2"""

LATEST_DRIFT_REPORT_SQL = """\
WITH latest AS (
  SELECT DISTINCT ON (r.model, r.version, r.target)
    r.id, r.model, r.version, r.target, r.created_at, r.share_drifted
  FROM drift_reports AS r
  WHERE $__timeFilter(r.created_at)
    AND r.model IN ($model)
    AND r.version IN ($version)
  ORDER BY r.model, r.version, r.target, r.created_at DESC, r.id DESC
)
SELECT
  l.created_at AS "report time",
  l.model,
  l.version,
  l.target,
  c.column_name AS feature,
  c.kind,
  c.method,
  c.score,
  c.threshold,
  c.drifted,
  c.status,
  c.note
FROM latest AS l
JOIN drift_columns AS c ON c.report_id = l.id
ORDER BY l.model, l.version, l.target, c.drifted DESC, c.column_name"""

DRIFT_EVENTS_SQL = """\
SELECT
  e.opened_at AS opened,
  e.kind,
  e.model,
  e.version,
  e.severity,
  e.status,
  e.occurrences,
  e.summary,
  e.resolved_at AS resolved
FROM events AS e
WHERE e.kind IN ('data_drift', 'prediction_drift')
  AND e.opened_at <= $__timeTo()
  AND coalesce(e.resolved_at, now()) >= $__timeFrom()
  AND e.model IN ($model)
  AND e.version IN ($version)
ORDER BY e.opened_at DESC"""

# The guard's headline metric of each task, as one "higher is better" fidelity value.
FIDELITY_SQL = """\
SELECT
  $__timeGroupAlias(f.ts, $__interval),
  concat(f.model, ':', f.version, ' vs ', f.source_version, ' [', f.arm, ']') AS metric,
  avg(coalesce((f.metrics ->> 'top1_agreement')::float8,
               (f.metrics ->> 'mean_cosine')::float8,
               1 - (f.metrics ->> 'rel_error')::float8)) AS fidelity
FROM fidelity_checks AS f
WHERE $__timeFilter(f.ts)
  AND f.model IN ($model)
  AND f.version IN ($version)
  AND f.status = 'ok'
GROUP BY 1, 2
ORDER BY 1, 2"""

LATEST_FIDELITY_SQL = """\
SELECT DISTINCT ON (f.model, f.arm)
  f.ts AS "checked",
  f.model,
  f.version,
  f.source_version AS source,
  f.arm,
  f.experiment_id AS experiment,
  f.rows,
  f.task,
  f.status,
  f.passed,
  f.message,
  f.event_id AS event
FROM fidelity_checks AS f
WHERE $__timeFilter(f.ts)
  AND f.model IN ($model)
  AND f.version IN ($version)
ORDER BY f.model, f.arm, f.ts DESC, f.id DESC"""

# Labels joined to sampled predictions by (model, request_id): see monitor/labels.py. Only
# metadata columns of samples: the Grafana role never reads sampled inputs or outputs.
LABEL_COVERAGE_SQL = """\
SELECT
  $__timeGroupAlias(s.ts, $__interval),
  concat(s.model, ':', s.version, ' [', s.arm, ']') AS metric,
  count(l.value)::float8 / count(s.id) AS coverage
FROM samples AS s
LEFT JOIN labels AS l ON l.model = s.model AND l.request_id = s.request_id
WHERE $__timeFilter(s.ts)
  AND s.model IN ($model)
  AND s.version IN ($version)
  AND s.arm <> 'reference'
GROUP BY 1, 2
ORDER BY 1, 2"""

TUNING_RUNS_SQL = """\
SELECT
  t.started_at AS started,
  t.id AS run,
  t.model,
  t.base_version AS "base version",
  t.status,
  t.objective,
  t.slo_ms AS "SLO (ms)",
  t.winner_version AS winner,
  t.baseline_throughput AS "baseline items/s",
  t.winner_throughput AS "winner items/s",
  t.speedup,
  extract(epoch FROM t.finished_at - t.started_at) AS "duration (s)",
  t.error
FROM tuning_runs AS t
WHERE $__timeFilter(t.started_at)
  AND t.model IN ($model)
ORDER BY t.started_at DESC"""

LEADERBOARD_SQL = """\
WITH latest AS (
  SELECT DISTINCT ON (r.model) r.id, r.model
  FROM tuning_runs AS r
  WHERE $__timeFilter(r.started_at)
    AND r.model IN ($model)
  ORDER BY r.model, r.started_at DESC, r.id DESC
)
SELECT
  l.model,
  l.id AS run,
  t.name AS candidate,
  t.is_winner AS winner,
  t.passed,
  t.batch_size AS "batch size",
  t.p50_ms AS "p50 @1 (ms)",
  t.p95_ms AS "p95 @1 (ms)",
  t.throughput AS "items/s",
  (
    SELECT string_agg(
      concat(m.key, ' ', CASE WHEN jsonb_typeof(m.value) = 'number'
                              THEN round(m.value::text::numeric, 4)::text
                              ELSE m.value::text END),
      ', ' ORDER BY m.key)
    FROM jsonb_each(t.accuracy) AS m
  ) AS accuracy,
  t.reason
FROM latest AS l
JOIN tuning_trials AS t ON t.run_id = l.id
-- trials are stored in the tuner's leaderboard order, best first
ORDER BY l.model, t.id"""

SPEEDUP_SQL = """\
SELECT
  concat(t.model, ':', t.winner_version, ' (run ', t.id, ')') AS winner,
  t.speedup
FROM tuning_runs AS t
WHERE $__timeFilter(t.started_at)
  AND t.model IN ($model)
  AND t.winner_version IS NOT NULL
  AND t.speedup IS NOT NULL
ORDER BY t.started_at"""

LATEST_SPEEDUP_SQL = """\
SELECT DISTINCT ON (t.model) t.model, t.speedup
FROM tuning_runs AS t
WHERE $__timeFilter(t.started_at)
  AND t.model IN ($model)
  AND t.speedup IS NOT NULL
ORDER BY t.model, t.started_at DESC, t.id DESC"""

EXPERIMENTS_SQL = f"""\
SELECT
  e.id AS experiment,
  e.model,
  e.champion_version AS champion,
  e.challenger_version AS challenger,
  CASE WHEN e.shadow THEN 'shadow' ELSE 'A/B' END AS mode,
  e.share,
  e.status,
  e.started_at AS started,
  e.ended_at AS ended,
  e.started_by AS "started by",
  e.reason
FROM experiments AS e
WHERE e.model IN ($model)
  AND {LIVE_EXPERIMENT_IN_RANGE}
ORDER BY e.started_at DESC"""  # noqa: S608 (constants of this file only)

# The same window as tuner.analysis.arm_stats: intervals that start at or after the
# experiment's exact start (an interval that began earlier may hold calls from before it)
# until it ended (or now), champion calls under the champion arm, the challenger's under the
# challenger or shadow arm. Quantiles as the analysis reads them (monitor.sketch.interpolated):
# each bucket's calls spread evenly in log space across it, the ceil(q * n)-th call read.
ARMS_SQL = f"""\
WITH arms AS (
  SELECT e.id AS experiment, e.model, a.arm, a.version, a.calls, a.errors, a.buckets
  FROM experiments AS e
  JOIN latency_aggregates AS a
    ON a.model = e.model
   AND a.interval_start >= e.started_at
   AND a.interval_start < coalesce(e.ended_at, now())
   AND ((a.arm = 'champion' AND a.version = e.champion_version)
     OR (a.arm IN ('challenger', 'shadow') AND a.version = e.challenger_version))
  WHERE e.model IN ($model)
    AND {LIVE_EXPERIMENT_IN_RANGE}
),
totals AS (
  SELECT experiment, model, arm, version, sum(calls) AS calls, sum(errors) AS errors
  FROM arms
  GROUP BY 1, 2, 3, 4
),
merged AS (
  SELECT arms.experiment, arms.arm, b.key::int AS bucket, sum(b.value::bigint) AS n
  FROM arms
  CROSS JOIN LATERAL jsonb_each_text(arms.buckets) AS b(key, value)
  GROUP BY 1, 2, 3
),
ranked AS (
  SELECT experiment, arm, bucket, n::float8 AS n,
    (sum(n) OVER (PARTITION BY experiment, arm ORDER BY bucket))::float8 AS running,
    (sum(n) OVER (PARTITION BY experiment, arm))::float8 AS total
  FROM merged
),
picked AS (
  SELECT DISTINCT ON (r.experiment, r.arm, q.q) r.experiment, r.arm, q.q,
    power({GAMMA}, r.bucket - 1 + (ceil(q.q * r.total) - 0.5 - (r.running - r.n)) / r.n) AS ms
  FROM ranked AS r
  CROSS JOIN (VALUES (0.5::float8), (0.95::float8)) AS q(q)
  WHERE r.running >= ceil(q.q * r.total)
  ORDER BY r.experiment, r.arm, q.q, r.bucket
),
quantiles AS (
  SELECT experiment, arm,
    max(ms) FILTER (WHERE q = 0.5) AS p50,
    max(ms) FILTER (WHERE q = 0.95) AS p95
  FROM picked
  GROUP BY 1, 2
)
SELECT
  t.experiment,
  t.model,
  t.arm,
  t.version,
  t.calls,
  t.errors::float8 / nullif(t.calls, 0) AS "error rate",
  q.p50 AS "p50 (ms)",
  q.p95 AS "p95 (ms)"
FROM totals AS t
JOIN quantiles AS q USING (experiment, arm)
ORDER BY t.experiment DESC, t.arm"""  # noqa: S608 (constants of this file only)

LIVE_EXPERIMENTS_SQL = """\
SELECT count(*) AS live
FROM experiments AS e
WHERE e.model IN ($model)
  AND e.status IN ('running', 'promotion_pending')"""

PENDING_COUNT_SQL = """\
SELECT count(*) AS pending
FROM promotions AS p
WHERE p.model IN ($model)
  AND p.status = 'pending'"""

# Pending is a current state: no time filter, an old request still waits for a decision.
PENDING_SQL = """\
SELECT
  p.id AS promotion,
  p.model,
  p.from_version AS "from",
  p.to_version AS "to",
  p.experiment_id AS experiment,
  p.created_at AS requested,
  (p.evidence #>> '{arms,champion,p95_ms}')::float8 AS "champion p95 (ms)",
  (p.evidence #>> '{arms,challenger,p95_ms}')::float8 AS "challenger p95 (ms)",
  coalesce(p.evidence ->> 'reason', '') AS reason
FROM promotions AS p
WHERE p.model IN ($model)
  AND p.status = 'pending'
ORDER BY p.created_at"""

HISTORY_SQL = """\
SELECT
  l.at AS "time",
  l.model,
  l.action,
  l.entity,
  l.entity_id AS id,
  l.actor,
  l.reason,
  l.details::text AS details
FROM audit_log AS l
WHERE $__timeFilter(l.at)
  AND l.model IN ($model)
  AND (starts_with(l.action, 'promotion_') OR starts_with(l.action, 'experiment_'))
ORDER BY l.at DESC, l.id DESC"""


def latency_quantile_sql(q: float, arms: tuple[str, ...] = ()) -> str:
    """Quantile ``q`` per time group and series, from the merged bucket histograms.

    Buckets of every row in a group are added, then the first bucket whose running count
    reaches ``ceil(q * total)`` gives the value: exactly :func:`monitor.sketch.quantiles`
    over the group, not an average of per-interval percentiles.
    """
    arm_filter = ""
    if arms:
        arm_filter = "\n    AND a.arm IN (" + ", ".join(f"'{arm}'" for arm in arms) + ")"
    # q and arms are constants of this file, never user input.
    return f"""\
WITH merged AS (
  SELECT
    $__timeGroupAlias(a.interval_start, $__interval),
    {SERIES} AS metric,
    b.key::int AS bucket,
    sum(b.value::bigint) AS n
  FROM latency_aggregates AS a
  CROSS JOIN LATERAL jsonb_each_text(a.buckets) AS b(key, value)
  WHERE $__timeFilter(a.interval_start)
    AND a.model IN ($model)
    AND a.version IN ($version){arm_filter}
  GROUP BY 1, 2, 3
),
ranked AS (
  SELECT "time", metric, bucket,
    sum(n) OVER (PARTITION BY "time", metric ORDER BY bucket) AS running,
    sum(n) OVER (PARTITION BY "time", metric) AS total
  FROM merged
)
SELECT "time", metric, min({BUCKET_MS}) AS p{round(q * 100)}_ms
FROM ranked
WHERE running >= ceil({q}::float8 * total::float8)
GROUP BY 1, 2
ORDER BY 1, 2"""  # noqa: S608


def events_annotation_sql(kinds: tuple[str, ...] = ()) -> str:
    """Events (open ones run until now) as Grafana annotations: time, timeend, text, tags."""
    kind_filter = ""
    if kinds:
        kind_filter = "\n  AND e.kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"
    # kinds are constants of this file, never user input.
    return f"""\
SELECT
  e.opened_at AS "time",
  coalesce(e.resolved_at, now()) AS timeend,
  concat(e.kind, ' ', e.model, ':', e.version, ' (', e.severity, ', ', e.status, '): ',
         e.summary) AS text,
  concat_ws(',', e.kind, e.severity, e.model) AS tags
FROM events AS e
WHERE e.opened_at <= $__timeTo()
  AND coalesce(e.resolved_at, now()) >= $__timeFrom()
  AND e.model IN ($model){kind_filter}
ORDER BY e.opened_at"""  # noqa: S608


# --- JSON building blocks -----------------------------------------------------------------


def target(sql: str, fmt: str = "table", ref: str = "A") -> dict[str, Any]:
    """A raw-SQL query of the tunewatch datasource (``fmt``: time_series or table)."""
    return {
        "refId": ref,
        "datasource": dict(DATASOURCE),
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": sql,
    }


def variable(name: str, label: str, sql: str) -> dict[str, Any]:
    """A multi-value query variable whose default is All."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": dict(DATASOURCE),
        "definition": sql,
        "query": sql,
        "refresh": 1,  # on dashboard load: new models appear without editing the dashboard
        "multi": True,
        "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }


def annotation(name: str, sql: str, color: str) -> dict[str, Any]:
    """An annotation query on the tunewatch datasource."""
    return {
        "name": name,
        "datasource": dict(DATASOURCE),
        "enable": True,
        "hide": False,
        "iconColor": color,
        "target": target(sql, "table", "Anno"),
    }


BUILT_IN_ANNOTATION = {
    "builtIn": 1,
    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
    "enable": True,
    "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)",
    "name": "Annotations & Alerts",
    "type": "dashboard",
}


@dataclass
class Panel:
    """One panel before layout: what it shows and how big it is."""

    kind: str
    title: str
    sql: str
    fmt: str = "table"
    unit: str = ""
    description: str = ""
    w: int = 12
    h: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        """The Grafana panel at grid position ``(x, y)``."""
        defaults: dict[str, Any] = {"custom": dict(self.custom)} if self.custom else {}
        if self.unit:
            defaults["unit"] = self.unit
        return {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": dict(DATASOURCE),
            "gridPos": {"h": self.h, "w": self.w, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": dict(self.options),
            "targets": [target(self.sql, self.fmt)],
        }


def timeseries(title: str, sql: str, unit: str, description: str, **kw: Any) -> Panel:
    """A time series panel; the query returns ``time``, ``metric`` and one value column."""
    options = {
        "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    custom = {"spanNulls": False, "showPoints": "auto", "lineWidth": 1}
    return Panel(
        "timeseries",
        title,
        sql,
        "time_series",
        unit,
        description,
        options=options,
        custom=custom,
        **kw,
    )


def stat(
    title: str, sql: str, unit: str, description: str, per_row: bool = False, **kw: Any
) -> Panel:
    """A single-number panel (one number per row of the result with ``per_row``)."""
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": per_row},
        "colorMode": "value",
        "graphMode": "none",
        "textMode": "auto",
    }
    return Panel("stat", title, sql, "table", unit, description, w=6, h=4, options=options, **kw)


def table(title: str, sql: str, description: str, **kw: Any) -> Panel:
    """A table panel."""
    options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    return Panel("table", title, sql, "table", "", description, options=options, **kw)


def layout(panels: list[Panel]) -> list[dict[str, Any]]:
    """Place panels left to right, top to bottom, on Grafana's 24-column grid."""
    out, x, y, row_h = [], 0, 0, 0
    for panel_id, p in enumerate(panels, start=1):
        if x + p.w > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append(p.to_json(panel_id, x, y))
        x, row_h = x + p.w, max(row_h, p.h)
    return out


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[Panel],
    variables: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
) -> dict[str, Any]:
    """A complete dashboard, ready for file provisioning."""
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": list(TAGS),
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {
                "title": "tunewatch",
                "type": "dashboards",
                "tags": list(TAGS),
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables},
        "annotations": {"list": [BUILT_IN_ANNOTATION, *annotations]},
        "panels": layout(panels),
    }


# --- the dashboards -----------------------------------------------------------------------

MODEL_VAR = variable("model", "Model", MODEL_VARIABLE_SQL)
VERSION_VAR = variable("version", "Version", VERSION_VARIABLE_SQL)
QUANTILE_NOTE = (
    "Computed from the merged latency histograms of each time group (1 % relative error), "
    "so it is a true percentile of all calls in the group, not an average of per-interval "
    "percentiles."
)


def overview() -> dict[str, Any]:
    """Traffic, errors, latency percentiles, samples and telemetry drops."""
    panels = [
        stat("Calls", TOTAL_CALLS_SQL, "short", "Calls recorded in the time range."),
        stat("Error rate", TOTAL_ERROR_RATE_SQL, "percentunit", "Failed calls / all calls."),
        stat(
            "Samples stored",
            TOTAL_SAMPLES_SQL,
            "short",
            "Input/output samples stored for drift detection and tuning.",
        ),
        stat(
            "Telemetry dropped",
            TOTAL_DROPS_SQL,
            "short",
            "Records the wrappers dropped (queue or buffer full) in processes that reported "
            "in the time range. Should stay empty.",
        ),
        timeseries("Calls per second", CALLS_PER_S_SQL, "reqps", "By model:version [arm]."),
        timeseries("Error rate", ERROR_RATE_SQL, "percentunit", "By model:version [arm]."),
        timeseries("Latency p50", latency_quantile_sql(0.5), "ms", QUANTILE_NOTE, w=8),
        timeseries("Latency p95", latency_quantile_sql(0.95), "ms", QUANTILE_NOTE, w=8),
        timeseries("Latency p99", latency_quantile_sql(0.99), "ms", QUANTILE_NOTE, w=8),
        timeseries("Samples stored", SAMPLES_SQL, "short", "Samples per time group."),
        table(
            "Telemetry drops",
            DROPS_TABLE_SQL,
            "Dropped telemetry by reason and host (cumulative per process).",
        ),
    ]
    return dashboard(
        "tunewatch-overview",
        "tunewatch / Overview",
        "Calls, errors and latency of every wrapped model, version and arm.",
        panels,
        [MODEL_VAR, VERSION_VAR],
        [annotation("Events", events_annotation_sql(), "red")],
    )


def drift() -> dict[str, Any]:
    """Per-feature drift scores, the share of drifted features, drift events and fidelity."""
    drift_kinds = ("data_drift", "prediction_drift")
    panels = [
        timeseries(
            "Drift score per feature",
            DRIFT_SCORE_SQL,
            "short",
            "Each column's test statistic: p-value methods (KS, chi-squared, Z) drift "
            "when below their threshold, distance methods (Wasserstein, "
            "Jensen-Shannon) when above. The method is in the series name.",
            w=24,
            h=10,
        ),
        timeseries(
            "Share of drifted features",
            DRIFT_SHARE_SQL,
            "percentunit",
            "Per model:version and target (inputs or outputs).",
        ),
        table("Drift events", DRIFT_EVENTS_SQL, "Data and prediction drift events."),
        table(
            "Latest drift report",
            LATEST_DRIFT_REPORT_SQL,
            "The newest report of each model:version and target, one row per column.",
            w=24,
            h=10,
        ),
        timeseries(
            "Fidelity to the source",
            FIDELITY_SQL,
            "percentunit",
            "Stored production inputs replayed through the serving version and through its "
            "source (the version a user registered): top-1 agreement for classifiers, mean "
            "cosine for embeddings, 1 - relative error for regressions. The champion is "
            "checked every fidelity_job_interval_s; experiments replay each arm. Below the "
            "guard's tolerance (0.99 top-1 by default) a fidelity_drop event opens.",
        ),
        table(
            "Latest fidelity check",
            LATEST_FIDELITY_SQL,
            "The newest check of each model and arm, with the guard's verdict.",
        ),
        timeseries(
            "Label coverage",
            LABEL_COVERAGE_SQL,
            "percentunit",
            "Share of the stored (sampled) predictions that have a label, by prediction "
            "time. Labels arrive later (mon.log_labels, tunewatch labels import), so recent "
            "groups fill in over time; missing (NaN) labels do not count. Realized accuracy, "
            "macro F1, log loss or MAE/RMSE/MAPE with intervals: tunewatch performance NAME; "
            "a significant drop beyond performance_tolerance opens a performance_drop event "
            "(the annotations).",
            w=24,
        ),
    ]
    return dashboard(
        "tunewatch-drift",
        "tunewatch / Drift",
        "Data and prediction drift of production inputs and outputs, fidelity to the source, "
        "and realized performance on labels.",
        panels,
        [MODEL_VAR, VERSION_VAR],
        [
            annotation("Drift events", events_annotation_sql(drift_kinds), "orange"),
            annotation("Fidelity events", events_annotation_sql(("fidelity_drop",)), "red"),
            annotation(
                "Performance events", events_annotation_sql(("performance_drop",)), "purple"
            ),
        ],
    )


def tuning() -> dict[str, Any]:
    """Tuning runs, the latest leaderboard and each winner's speed-up."""
    panels = [
        stat(
            "Latest speed-up",
            LATEST_SPEEDUP_SQL,
            "suffix:x",
            "Winner throughput / baseline throughput of the newest run per model.",
            per_row=True,
        ),
        Panel(
            "barchart",
            "Speed-up of each winner",
            SPEEDUP_SQL,
            "table",
            "suffix:x",
            "Winner throughput over its baseline, per tuning run.",
            w=18,
            h=8,
            options={
                "xField": "winner",
                "orientation": "horizontal",
                "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
            },
        ),
        table("Tuning runs", TUNING_RUNS_SQL, "Every run in the time range.", w=24),
        table(
            "Leaderboard of the latest run",
            LEADERBOARD_SQL,
            "Every candidate of each model's newest run, best first: latency at batch 1, "
            "throughput at its best batch size, accuracy against the champion, verdict.",
            w=24,
            h=12,
        ),
    ]
    return dashboard(
        "tunewatch-tuning",
        "tunewatch / Tuning",
        "What the tuner tried, what won and by how much.",
        panels,
        [MODEL_VAR],
        [annotation("Latency events", events_annotation_sql(("latency_regression",)), "red")],
    )


def experiments() -> dict[str, Any]:
    """Experiments arm by arm, pending approvals, promotion and rollback history."""
    rollbacks = ("experiment_rollback", "promotion_rollback")
    arms = ("champion", "challenger", "shadow")
    panels = [
        stat("Live experiments", LIVE_EXPERIMENTS_SQL, "short", "Running or awaiting approval."),
        stat(
            "Pending approvals",
            PENDING_COUNT_SQL,
            "short",
            "Promotion requests waiting for a person.",
        ),
        table("Experiments", EXPERIMENTS_SQL, "Experiments overlapping the time range.", w=24),
        table(
            "Arms side by side",
            ARMS_SQL,
            "Per experiment and arm, from the latency histograms over the experiment (the "
            "window the analysis uses).",
            w=24,
        ),
        timeseries("Latency p95 per arm", latency_quantile_sql(0.95, arms), "ms", QUANTILE_NOTE),
        table(
            "Pending approvals",
            PENDING_SQL,
            "Approve with `tunewatch approve ID --by NAME` or on the approval page.",
        ),
        table(
            "Promotion and rollback history",
            HISTORY_SQL,
            "Who started, promoted, approved, rejected or rolled back what, and why.",
            w=24,
            h=10,
        ),
    ]
    variables = [MODEL_VAR, VERSION_VAR]
    return dashboard(
        "tunewatch-experiments",
        "tunewatch / Experiments and promotions",
        "A/B and shadow experiments, approvals and the audit trail.",
        panels,
        variables,
        [annotation("Rollbacks", events_annotation_sql(rollbacks), "purple")],
    )


DASHBOARDS = {
    "overview.json": overview,
    "drift.json": drift,
    "tuning.json": tuning,
    "experiments.json": experiments,
}


def build_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard (what ``main`` writes)."""
    return {name: json.dumps(make(), indent=2) + "\n" for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards, or with ``--check`` report which ones are out of date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build_all().items():
        path = args.out / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"stale dashboards: {', '.join(stale)}; run python dashboards/generate.py")
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(DASHBOARDS)} dashboards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
