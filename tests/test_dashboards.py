"""Grafana dashboards: the committed JSON is what generate.py makes, it holds what Grafana
needs, and every query (panels, variables, annotations) runs on a seeded PostgreSQL schema
with the macros and variables expanded as Grafana expands them, also as the read-only role.

No Grafana server runs here, so the expansion below follows Grafana's code: the frontend's
template service with the SQL datasource's ``interpolateVariable``, the backend's global
``Interpolate`` (``pkg/tsdb/sqleng``) and the PostgreSQL macro engine
(``pkg/tsdb/grafana-postgresql-datasource/macros.go``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateSchema, DropSchema

from monitor import Settings, sketch, storage
from tests.conftest import IN_CI, PG_ADMIN_URL, require_postgres
from tuner.demo import seed_database
from tuner.fidelity import run_fidelity

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
JSON_DIR = DASHBOARDS / "json"
DATASOURCE_FILE = DASHBOARDS / "provisioning" / "datasources" / "tunewatch.yaml"
READER_SQL = DASHBOARDS / "grafana_reader.sql"
WINDOW = timedelta(hours=6)  # the dashboards' default time range (now-6h .. now)
INTERVAL = timedelta(minutes=1)


def load_generator() -> ModuleType:
    """Import dashboards/generate.py (a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "tunewatch_dashboards", DASHBOARDS / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def committed_dashboards() -> dict[str, dict[str, Any]]:
    """File name -> parsed JSON of every committed dashboard."""
    return {p.name: json.loads(p.read_text()) for p in sorted(JSON_DIR.glob("*.json"))}


# --- Grafana's expansion of a SQL query ---------------------------------------------------

# templateSrv's variable syntaxes: $name, [[name:format]], ${name.field:format}.
TEMPLATE_RE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"
)
MACRO_RE = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")  # macros.go sExpr
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


class ExpansionError(ValueError):
    """Grafana would refuse this query (unknown macro, bad argument, undefined variable)."""


@dataclass(frozen=True)
class QueryContext:
    """What Grafana knows when it runs a query: time range, interval, variable values."""

    start: datetime
    end: datetime
    interval: timedelta = INTERVAL
    variables: Mapping[str, Sequence[str]] = field(default_factory=dict)


def rfc3339nano(t: datetime) -> str:
    """Go's ``time.RFC3339Nano`` of a UTC time: trailing zeros of the fraction dropped."""
    t = t.astimezone(timezone.utc)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def format_interval(d: timedelta) -> str:
    """``gtime.FormatInterval``: the largest whole unit, truncated (90 s -> "1m")."""
    ms = int(d.total_seconds() * 1000)
    for unit, size in (("y", 31536000000), ("d", 86400000), ("h", 3600000), ("m", 60000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms // 1000}s" if ms >= 1000 else f"{max(ms, 1)}ms"


def parse_interval(text: str) -> float:
    """``gtime.ParseInterval`` for the forms dashboards use: seconds of "10s", "1m", "1h"..."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)", text.strip().strip("'"))
    if match is None:
        raise ExpansionError(f"error parsing interval {text}")
    return int(match.group(1)) * UNITS[match.group(2)]


def go_float(x: float) -> str:
    """Go's ``%v`` of a float64: 60 -> "60", 0.5 -> "0.5"."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def quote_literal(value: str) -> str:
    """The SQL datasource's ``quoteLiteral``."""
    return "'" + value.replace("'", "''") + "'"


def format_variable(values: Sequence[str], fmt: str | None) -> str:
    """A multi-value variable as the SQL datasource (or an explicit format) renders it."""
    if fmt in (None, "sqlstring"):  # interpolateVariable and the sqlstring format agree
        return ",".join(quote_literal(v) for v in values)
    if fmt in ("raw", "csv"):
        return ",".join(values)
    raise ExpansionError(f"variable format {fmt!r} is not handled by this harness")


def interpolate_variables(text: str, ctx: QueryContext) -> str:
    """The frontend: template variables and the built-in ``$__interval(_ms)``."""
    scoped = {
        "__interval": format_interval(ctx.interval),
        "__interval_ms": str(int(ctx.interval.total_seconds() * 1000)),
    }

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if name in scoped:
            return scoped[name]
        if name in ctx.variables:
            return format_variable(ctx.variables[name], fmt)
        return m.group(0)  # macros such as $__timeFilter are the backend's

    return TEMPLATE_RE.sub(replace, text)


def interpolate_globals(text: str, ctx: QueryContext) -> str:
    """The backend's ``sqleng.Interpolate``, run before the macro engine."""
    text = text.replace("$__interval_ms", str(int(ctx.interval.total_seconds() * 1000)))
    text = text.replace("$__interval", format_interval(ctx.interval))
    text = text.replace("$__unixEpochFrom()", str(int(ctx.start.timestamp())))
    return text.replace("$__unixEpochTo()", str(int(ctx.end.timestamp())))


def evaluate_macro(name: str, args: list[str], ctx: QueryContext) -> str:
    """One macro of the PostgreSQL macro engine (non-TimescaleDB)."""
    start, end = rfc3339nano(ctx.start), rfc3339nano(ctx.end)
    needs_column = name in ("__time", "__timeEpoch", "__timeFilter", "__unixEpochFilter")
    if needs_column and not args[0]:
        raise ExpansionError(f"missing time column argument for macro {name}")
    if name == "__time":
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        return f"{args[0]} BETWEEN '{start}' AND '{end}'"
    if name == "__timeFrom":
        return f"'{start}'"
    if name == "__timeTo":
        return f"'{end}'"
    if name in ("__timeGroup", "__timeGroupAlias"):
        if len(args) < 2:
            raise ExpansionError(f"macro {name} needs time column and interval")
        secs = go_float(parse_interval(args[1]))
        group = f"floor(extract(epoch from {args[0]})/{secs})*{secs}"
        return group + (' AS "time"' if name == "__timeGroupAlias" else "")
    if name == "__unixEpochFilter":
        c, a, b = args[0], int(ctx.start.timestamp()), int(ctx.end.timestamp())
        return f"{c} >= {a} AND {c} <= {b}"
    raise ExpansionError(f"unknown macro {name!r}")


def expand_macros(text: str, ctx: QueryContext) -> str:
    """The macro engine: ``$__name(args)`` with arguments split on commas and trimmed."""

    def replace(m: re.Match[str]) -> str:
        name = m.group(1)
        # Grafana turns $__timeGroup(...) directly followed by "," into the alias form.
        after = text.find(m.group(0)) + len(m.group(0))
        if name == "__timeGroup" and text[after : after + 1] == ",":
            name = "__timeGroupAlias"
        return evaluate_macro(name, [a.strip(" ") for a in m.group(2).split(",")], ctx)

    return MACRO_RE.sub(replace, text)


def expand(text: str, ctx: QueryContext) -> str:
    """A dashboard query as PostgreSQL receives it from Grafana."""
    out = expand_macros(interpolate_globals(interpolate_variables(text, ctx), ctx), ctx)
    left = re.search(r"\$\{?\w+|\[\[\w+", out)
    if left:
        raise ExpansionError(f"{left.group(0)!r} is not a variable of this dashboard")
    return out


# --- running a dashboard --------------------------------------------------------------------


@dataclass
class QueryRun:
    """One query of a dashboard as run: where it is, what came back or what failed."""

    dashboard: str
    where: str
    fmt: str
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    error: str | None = None

    def has_data(self) -> bool:
        """At least one row with a value (an aggregate over nothing gives one NULL row)."""
        return any(v is not None for row in self.rows for v in row)


def shape_error(run: QueryRun) -> str | None:
    """What Grafana would reject in a result of this format, if anything."""
    if run.fmt == "annotation" and not {"time", "text"} <= set(run.columns):
        return f"annotation needs 'time' and 'text' columns, got {run.columns}"
    if run.fmt != "time_series":
        return None
    if "time" not in run.columns:
        return f"time_series needs a 'time' column, got {run.columns}"
    times = [row[run.columns.index("time")] for row in run.rows]
    if times != sorted(times):
        return "time_series rows must be sorted by time"
    return None


def execute(conn: psycopg.Connection[Any], run: QueryRun, text: str, ctx: QueryContext) -> None:
    """Expand and run one query in a savepoint; record rows or the error."""
    try:
        query = expand(text, ctx)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query.encode())
            run.columns = [d.name for d in cur.description or []]
            run.rows = cur.fetchall()
    except (psycopg.Error, ExpansionError) as exc:
        run.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        return
    run.error = shape_error(run)


def run_dashboard(
    conn: psycopg.Connection[Any], dash: dict[str, Any], start: datetime, end: datetime
) -> list[QueryRun]:
    """Resolve the variables (All selected) in order, then run annotations and panels."""
    title, runs = dash["title"], []
    values: dict[str, list[str]] = {}
    for var in dash["templating"]["list"]:
        run = QueryRun(title, f"variable ${var['name']}", "table")
        execute(conn, run, var["query"], QueryContext(start, end, variables=values))
        values[var["name"]] = list(dict.fromkeys(str(r[0]) for r in run.rows))
        runs.append(run)
    ctx = QueryContext(start, end, variables=values)
    for ann in dash["annotations"]["list"]:
        if "target" in ann:
            run = QueryRun(title, f"annotation {ann['name']!r}", "annotation")
            execute(conn, run, ann["target"]["rawSql"], ctx)
            runs.append(run)
    for panel in dash["panels"]:
        for t in panel["targets"]:
            run = QueryRun(title, f"panel {panel['title']!r}", t["format"])
            execute(conn, run, t["rawSql"], ctx)
            runs.append(run)
    return runs


def run_all(conn: psycopg.Connection[Any], end: datetime) -> list[QueryRun]:
    """Every query of every committed dashboard over the default time range."""
    return [
        run
        for dash in committed_dashboards().values()
        for run in run_dashboard(conn, dash, end - WINDOW, end)
    ]


def report(runs: list[QueryRun]) -> str:
    """One line per query: where, rows or error (printed for ``pytest -s``)."""
    return "\n".join(f"{r.dashboard} / {r.where}: {r.error or f'{len(r.rows)} rows'}" for r in runs)


# --- PostgreSQL connections -------------------------------------------------------------------


def pg_params() -> dict[str, Any]:
    """Connection parameters of the test server (from TUNEWATCH_TEST_PG_URL)."""
    url = make_url(PG_ADMIN_URL)
    params = {"host": url.host, "port": url.port or 5432, "dbname": url.database}
    params["user"] = url.username
    if url.password:
        params["password"] = url.password
    return {k: v for k, v in params.items() if v is not None}


def connect(schema: str | None = None, **overrides: Any) -> psycopg.Connection[Any]:
    """A connection to the test server, with ``schema`` first on the search path."""
    params = {**pg_params(), **overrides}
    if schema is not None:
        params["options"] = f"-c search_path={schema}"
    return psycopg.connect(**params)


# --- seeding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """A fresh schema filled by the demo's whole flow (``tuner.demo.seed_database``)."""

    url: str
    schema: str
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def seeded_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """A fresh PostgreSQL schema at head, seeded by the demo's whole flow."""
    require_postgres()
    name = f"tw_dash_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(CreateSchema(name))
    url = f"{PG_ADMIN_URL}?options=-csearch_path%3D{name}"
    try:
        engine = storage.create_db_engine(url)
        storage.upgrade(engine)
        engine.dispose()
        workdir = tmp_path_factory.mktemp("seed")
        settings = Settings(database_url=url, artifacts_dir=str(workdir / "artifacts"))
        summary = seed_database(settings)
        db = storage.Database(url)
        try:  # the demo's experiment replayed both arms; the champion gets its own check too
            summary["fidelity"] = [c.to_dict() for c in run_fidelity(db, settings)]
            summary["labels"] = _seed_labels(db)
        finally:
            db.dispose()
        yield Seeded(url, name, summary)
    finally:
        with admin.begin() as conn:
            conn.execute(DropSchema(name, cascade=True))
        admin.dispose()


def _seed_labels(db: storage.Database) -> dict[str, int]:
    """Ids on half of the demo's class-score samples and their labels (every tenth one wrong),
    as a team that logs ground truth later would have them."""
    from sqlalchemy import select, update

    from monitor import schema
    from monitor.labels import log_labels

    t = schema.Sample
    with db.session() as s:
        rows = s.execute(select(t.id, t.model, t.outputs).where(t.outputs.is_not(None))).all()
        picked = [(i, m, o["top_class"]) for i, m, o in rows if o and "top_class" in o][::2]
        s.execute(update(t), [{"id": i, "request_id": f"seed-{i}"} for i, _, _ in picked])
    labelled: dict[str, int] = {}
    for model in sorted({m for _, m, _ in picked}):
        mine = [(i, c) for i, m, c in picked if m == model]
        labels = [c if k % 10 else (c + 1) % 10 for k, (_, c) in enumerate(mine)]
        log_labels(db, model, [f"seed-{i}" for i, _ in mine], labels)
        labelled[model] = len(mine)
    return labelled


@pytest.fixture(scope="module")
def owner_runs(seeded_pg: Seeded) -> list[QueryRun]:
    """Every dashboard query run as the tables' owner over the last six hours."""
    with connect(seeded_pg.schema) as conn:
        runs = run_all(conn, datetime.now(timezone.utc))
    print("\n" + report(runs))
    return runs


# Panels whose data a real flow may not produce (nothing dropped, nothing pending, no drift):
# with the demo's data they must have rows exactly when this probe finds their data.
DATA_PROBES = {
    "Telemetry dropped": "SELECT 1 FROM telemetry_counters WHERE starts_with(name, 'dropped_')",
    "Telemetry drops": "SELECT 1 FROM telemetry_counters WHERE starts_with(name, 'dropped_')",
    "Pending approvals": "SELECT 1 FROM promotions WHERE status = 'pending'",
    "Drift score per feature": "SELECT 1 FROM drift_columns WHERE score IS NOT NULL",
    "Share of drifted features": "SELECT 1 FROM drift_reports WHERE status = 'ok'",
    "Latest drift report": "SELECT 1 FROM drift_reports",
    "Drift events": "SELECT 1 FROM events WHERE kind IN ('data_drift', 'prediction_drift')",
    "Events": "SELECT 1 FROM events",
    "Latency events": "SELECT 1 FROM events WHERE kind = 'latency_regression'",
    "Rollbacks": "SELECT 1 FROM events WHERE kind IN ('experiment_rollback', 'promotion_rollback')",
    "Fidelity events": "SELECT 1 FROM events WHERE kind = 'fidelity_drop'",
    "Performance events": "SELECT 1 FROM events WHERE kind = 'performance_drop'",
}


def expected_empty(conn: psycopg.Connection[Any], run: QueryRun) -> bool:
    """Whether a query may return nothing: only when its probe finds no data either."""
    title = run.where.split(" ", 1)[1].strip("'")
    probe = DATA_PROBES.get(title)
    if probe is None:
        return False
    with conn.cursor() as cur:
        return cur.execute(probe.encode()).fetchone() is None


# --- the committed JSON -------------------------------------------------------------------------


def test_generated_json_is_committed() -> None:
    generated = load_generator().build_all()
    on_disk = {p.name: p.read_text() for p in JSON_DIR.glob("*.json")}
    assert set(on_disk) == set(generated), "run python dashboards/generate.py"
    stale = [name for name, text in generated.items() if on_disk[name] != text]
    assert not stale, f"{stale} differ from generate.py's output: run python dashboards/generate.py"


def test_generator_check_mode_reports_stale_files(tmp_path: Path) -> None:
    gen = load_generator()
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "drift.json").write_text("{}")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


def provisioned_datasource() -> dict[str, Any]:
    """The one datasource of the provisioning file."""
    (ds,) = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    return dict(ds)


def test_datasource_is_postgres_with_credentials_from_the_environment() -> None:
    ds = provisioned_datasource()
    assert ds["type"] == "grafana-postgresql-datasource" and ds["uid"] == "tunewatch-pg"
    assert re.fullmatch(r"\$\{\w+\}", ds["secureJsonData"]["password"])
    assert re.fullmatch(r"\$\{\w+\}", ds["user"]) and re.fullmatch(r"\$\{\w+\}", ds["url"])


def sql_of(dash: dict[str, Any]) -> list[str]:
    """Every SQL text of a dashboard: variables, annotations, panel targets."""
    texts = [v["query"] for v in dash["templating"]["list"]]
    texts += [a["target"]["rawSql"] for a in dash["annotations"]["list"] if "target" in a]
    return texts + [t["rawSql"] for p in dash["panels"] for t in p["targets"]]


@pytest.mark.parametrize("name", sorted(p.name for p in JSON_DIR.glob("*.json")))
def test_dashboard_has_what_grafana_needs(name: str) -> None:
    dash = committed_dashboards()[name]
    uid = provisioned_datasource()["uid"]
    assert dash["uid"].startswith("tunewatch-") and dash["title"] and dash.get("id") is None
    assert dash["schemaVersion"] >= 39
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["panels"]
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) for k in "hwxy") and pos["x"] + pos["w"] <= 24
        assert p["datasource"]["uid"] == uid and p["title"] and p["targets"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["rawSql"].strip() and t["refId"]
            assert t["format"] == ("time_series" if p["type"] == "timeseries" else "table")
    variables = dash["templating"]["list"]
    assert "model" in [v["name"] for v in variables]
    for v in variables:
        assert v["type"] == "query" and v["query"].strip() and v["datasource"]["uid"] == uid
        assert v["multi"] and v["includeAll"]
    anns = [a for a in dash["annotations"]["list"] if "target" in a]
    assert anns and all(a["datasource"]["uid"] == uid for a in anns)
    names = {v["name"] for v in variables}
    used = {m for text in sql_of(dash) for m in re.findall(r"\$(?!__)(\w+)", text)}
    assert used <= names, f"{name} uses undefined variables {used - names}"


def test_dashboard_uids_are_unique() -> None:
    uids = [d["uid"] for d in committed_dashboards().values()]
    assert len(uids) == len(set(uids)) == 4


# --- the expansion itself ---------------------------------------------------------------------

CTX = QueryContext(
    datetime(2026, 3, 2, 6, 0, tzinfo=timezone.utc),
    datetime(2026, 3, 2, 12, 0, 0, 250000, tzinfo=timezone.utc),
    timedelta(minutes=1),
    {"model": ["digits", "o'brien"], "version": ["v1"]},
)


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("$__timeFilter(ts)", "ts BETWEEN '2026-03-02T06:00:00Z' AND '2026-03-02T12:00:00.25Z'"),
        ("$__timeGroupAlias(a.ts, $__interval)", 'floor(extract(epoch from a.ts)/60)*60 AS "time"'),
        ("$__timeGroup(ts, '5m')", "floor(extract(epoch from ts)/300)*300"),
        ("$__timeGroup(ts,1h), x", 'floor(extract(epoch from ts)/3600)*3600 AS "time", x'),
        ("$__timeFrom() < $__timeTo()", "'2026-03-02T06:00:00Z' < '2026-03-02T12:00:00.25Z'"),
        ("$__unixEpochFilter(t)", "t >= 1772431200 AND t <= 1772452800"),
        ("$__interval_ms / $__interval", "60000 / 1m"),
        ("model IN ($model)", "model IN ('digits','o''brien')"),
        ("model IN (${model:sqlstring})", "model IN ('digits','o''brien')"),
        ("v IN ([[version]])", "v IN ('v1')"),
    ],
)
def test_macros_and_variables_expand_like_grafana(text: str, expanded: str) -> None:
    assert expand(text, CTX) == expanded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$__timeFilterz(ts)", "unknown macro"),
        ("$__timeGroup(ts)", "needs time column and interval"),
        ("$__timeGroup(ts, soon)", "error parsing interval"),
        ("model IN ($modle)", "not a variable"),
        ("${model:json}", "not handled"),
    ],
)
def test_expansion_refuses_what_grafana_refuses(text: str, message: str) -> None:
    with pytest.raises(ExpansionError, match=message):
        expand(text, CTX)


# --- the queries on seeded data ----------------------------------------------------------------


def test_every_query_runs_and_returns_rows(seeded_pg: Seeded, owner_runs: list[QueryRun]) -> None:
    errors = [f"{r.dashboard} / {r.where}: {r.error}" for r in owner_runs if r.error]
    assert not errors, "\n".join(errors)
    with connect(seeded_pg.schema) as conn:
        empty = [
            f"{r.dashboard} / {r.where}"
            for r in owner_runs
            if not r.has_data() and not expected_empty(conn, r)
        ]
    assert not empty, f"no rows although the data exists: {empty}"
    assert len(owner_runs) >= 30


def test_a_renamed_column_is_reported(seeded_pg: Seeded) -> None:
    overview = committed_dashboards()["overview.json"]
    end = datetime.now(timezone.utc)
    with connect(seeded_pg.schema) as conn:  # the rename is rolled back when the block ends
        conn.execute(b"ALTER TABLE latency_aggregates RENAME COLUMN buckets TO histogram")
        runs = run_dashboard(conn, overview, end - WINDOW, end)
        conn.rollback()
    failed = {r.where: r.error for r in runs if r.error}
    assert set(failed) == {f"panel 'Latency p{q}'" for q in (50, 95, 99)}
    assert all("column a.buckets does not exist" in str(e) for e in failed.values())


def test_latency_percentiles_are_quantiles_of_the_merged_histograms(seeded_pg: Seeded) -> None:
    overview = committed_dashboards()["overview.json"]
    (p95,) = [p for p in overview["panels"] if p["title"] == "Latency p95"]
    end = datetime.now(timezone.utc)
    with connect(seeded_pg.schema) as conn:
        models = [r[0] for r in conn.execute(b"SELECT DISTINCT model FROM latency_aggregates")]
        versions = [r[0] for r in conn.execute(b"SELECT DISTINCT version FROM latency_aggregates")]
        ctx = QueryContext(end - WINDOW, end, variables={"model": models, "version": versions})
        got = {
            (t, m): v for t, m, v in conn.execute(expand(p95["targets"][0]["rawSql"], ctx).encode())
        }
        rows = conn.execute(
            b"SELECT interval_start, model, version, arm, buckets FROM latency_aggregates"
            b" WHERE interval_start BETWEEN %s AND %s",
            (end - WINDOW, end),
        ).fetchall()
    groups: dict[tuple[float, str], list[dict[int, int]]] = defaultdict(list)
    for start, model, version, arm, buckets in rows:
        minute = math.floor(start.timestamp() / 60) * 60
        groups[(minute, f"{model}:{version} [{arm}]")].append(
            {int(k): v for k, v in buckets.items()}
        )
    expected = {k: sketch.quantiles(sketch.merge(h), [0.95])[0] for k, h in groups.items()}
    assert len(expected) >= 3
    assert {(float(t), m) for t, m in got} == set(expected)
    for (t, m), value in got.items():
        assert value == pytest.approx(expected[(float(t), m)], rel=1e-12), (t, m)


def test_arms_side_by_side_match_the_experiment_analysis(seeded_pg: Seeded) -> None:
    summary = seeded_pg.summary
    end = datetime.now(timezone.utc)
    with connect(seeded_pg.schema) as conn:
        runs = run_dashboard(conn, committed_dashboards()["experiments.json"], end - WINDOW, end)
    (arms,) = [r for r in runs if r.where == "panel 'Arms side by side'"]
    rows = [dict(zip(arms.columns, row)) for row in arms.rows]
    mine = {r["arm"]: r for r in rows if r["experiment"] == summary["experiment"]}
    for arm in ("champion", "challenger"):
        ev = summary["evidence"]["arms"][arm]
        assert (mine[arm]["version"], mine[arm]["calls"]) == (ev["version"], ev["calls"])
        assert mine[arm]["error rate"] == pytest.approx(ev["error_rate"])
        for q in ("p50", "p95"):  # the analysis rounds to 4 decimals
            assert mine[arm][f"{q} (ms)"] == pytest.approx(ev[f"{q}_ms"], abs=5.1e-5)


# --- the read-only role --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    """The role grafana_reader.sql made, and its password."""

    role: str
    password: str


def psql(*args: str) -> subprocess.CompletedProcess[str]:
    """Run psql on the test database as the admin user, without ~/.psqlrc."""
    exe = shutil.which("psql")
    if exe is None:
        message = "psql is not installed: it runs dashboards/grafana_reader.sql"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    p = pg_params()
    conn = ["-h", str(p["host"]), "-p", str(p["port"]), "-U", str(p["user"]), "-d", p["dbname"]]
    env = {**os.environ, "PGPASSWORD": p.get("password", "")}
    return subprocess.run([exe, "-X", *conn, *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def grafana_reader(seeded_pg: Seeded) -> Iterator[Reader]:
    """Run grafana_reader.sql twice (it is idempotent) for a role of this test run."""
    reader = Reader(f"tw_grafana_{uuid.uuid4().hex[:8]}", f"pw'{uuid.uuid4().hex}")
    args = ["-v", f"grafana_role={reader.role}", "-v", f"schema={seeded_pg.schema}"]
    try:
        for _ in range(2):
            done = psql(*args, "-v", f"grafana_password={reader.password}", "-f", str(READER_SQL))
            assert done.returncode == 0, done.stderr
        yield reader
    finally:
        with connect() as conn:
            role = sql.Identifier(reader.role)
            conn.execute(sql.SQL("DROP OWNED BY {}").format(role))  # privileges and defaults
            conn.execute(sql.SQL("DROP ROLE {}").format(role))


def connect_as(reader: Reader) -> psycopg.Connection[Any]:
    """Log in as the reader: its search path and read-only default come from the role."""
    return connect(user=reader.role, password=reader.password)


def test_reader_script_needs_a_password() -> None:
    require_postgres()
    done = psql("-v", "grafana_role=tw_grafana_never", "-f", str(READER_SQL))
    assert done.returncode != 0 and "needs a password" in done.stderr
    with connect() as conn:
        assert (
            conn.execute(b"SELECT 1 FROM pg_roles WHERE rolname = 'tw_grafana_never'").fetchone()
            is None
        )


def test_every_query_runs_as_the_read_only_role(
    grafana_reader: Reader, owner_runs: list[QueryRun]
) -> None:
    with connect_as(grafana_reader) as conn:
        runs = run_all(conn, datetime.now(timezone.utc))
    errors = [f"{r.dashboard} / {r.where}: {r.error}" for r in runs if r.error]
    assert not errors, "\n".join(errors)
    as_owner = {(r.dashboard, r.where): r.has_data() for r in owner_runs}
    assert {(r.dashboard, r.where): r.has_data() for r in runs} == as_owner


@pytest.mark.parametrize(
    "statement",
    [
        b"SELECT raw FROM samples LIMIT 1",
        b"SELECT features FROM samples LIMIT 1",
        b"INSERT INTO audit_log (at, actor, action, entity, model, reason, details)"
        b" VALUES (now(), 'x', 'x', 'x', 'x', '', '{}')",
        b"UPDATE promotions SET status = 'approved'",
        b"CREATE TABLE grafana_was_here (id int)",
    ],
)
def test_the_reader_cannot_see_inputs_or_write(grafana_reader: Reader, statement: bytes) -> None:
    with connect_as(grafana_reader) as conn:
        conn.execute(b"SET default_transaction_read_only = off")  # privileges alone must hold
        conn.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)


def test_the_reader_can_read_tables_of_future_migrations(
    seeded_pg: Seeded, grafana_reader: Reader
) -> None:
    with connect(seeded_pg.schema) as conn:
        conn.execute(b"CREATE TABLE future_table (id int)")
        conn.execute(b"INSERT INTO future_table VALUES (1)")
        conn.commit()
    with connect_as(grafana_reader) as conn:
        assert conn.execute(b"SELECT id FROM future_table").fetchall() == [(1,)]
        assert conn.execute(b"SHOW transaction_read_only").fetchone() == ("on",)
