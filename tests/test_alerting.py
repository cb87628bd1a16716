"""Alerts that reach people: webhook bodies chat tools accept, and the Grafana alert rules."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_dashboards import QueryContext, expand

from monitor import schema, storage
from monitor.events import KINDS, EventRecord, Notifier
from monitor.storage import Database, utcnow


class _ChatHook(BaseHTTPRequestHandler):
    """An incoming webhook that answers like Slack's: 400 ``no_text`` without a ``text``."""

    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _ChatHook.received.append(body)
        ok = isinstance(body.get("text"), str) and body["text"].strip() != ""
        self.send_response(200 if ok else 400)
        self.end_headers()
        self.wfile.write(b"ok" if ok else b"no_text")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook_url() -> Iterator[str]:
    _ChatHook.received = []
    server = HTTPServer(("127.0.0.1", 0), _ChatHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def _event(action: str) -> EventRecord:
    now = utcnow()
    return EventRecord(
        7, "latency_regression", "clf", "v2", "main", "warning",
        "clf:v2 [main] latency regressed: median x1.40 <p95 x1.52> & more", {"p_value": 1e-9},
        "open", 1, now, now, None, None, action,
    )  # fmt: skip


def test_webhook_bodies_carry_a_chat_text_beside_the_event(hook_url: str) -> None:
    notifier = Notifier(hook_url, retries=0)
    assert notifier.notify(_event("opened")) is True
    assert notifier.notify(_event("resolved")) is True
    assert notifier.notify_text("promotion 3 of clf waits for approval") is True
    opened, resolved, note = _ChatHook.received
    assert opened["text"] == (
        "[tunewatch] latency_regression opened, warning (event 7): clf:v2 [main] latency "
        "regressed: median x1.40 &lt;p95 x1.52&gt; &amp; more"
    )
    assert opened["event"]["id"] == 7 and opened["event"]["details"] == {"p_value": 1e-9}
    assert resolved["text"].startswith("[tunewatch] latency_regression resolved, warning")
    assert note == {"text": "[tunewatch] promotion 3 of clf waits for approval",
                    "message": "promotion 3 of clf waits for approval"}  # fmt: skip


# --- Grafana alert rules ----------------------------------------------------------------------

ALERTING = Path(__file__).resolve().parents[1] / "dashboards" / "alerting"
DATASOURCES = ALERTING.parent / "provisioning" / "datasources" / "tunewatch.yaml"


def alert_rules() -> dict[str, dict[str, Any]]:
    """uid -> rule of every provisioned alert rule file."""
    rules: dict[str, dict[str, Any]] = {}
    for path in sorted(ALERTING.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == 1, path
        for group in doc["groups"]:
            for rule in group["rules"]:
                assert rule["uid"] not in rules, f"duplicate uid {rule['uid']}"
                rules[rule["uid"]] = rule
    return rules


def query_of(rule: dict[str, Any]) -> tuple[str, int]:
    """The rule's SQL and its relative time range (seconds)."""
    (sql_query,) = [d for d in rule["data"] if d["datasourceUid"] != "__expr__"]
    return sql_query["model"]["rawSql"], int(sql_query["relativeTimeRange"]["from"])


def test_alert_rules_are_complete_and_point_at_the_provisioned_datasource() -> None:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    rules = alert_rules()
    assert set(rules) == {"tunewatch-latency-regression", "tunewatch-drift",
                          "tunewatch-fidelity-drop", "tunewatch-telemetry-drops"}  # fmt: skip
    for uid, rule in rules.items():
        refs = {d["refId"]: d for d in rule["data"]}
        assert rule["condition"] in refs, uid
        condition = refs[rule["condition"]]["model"]
        assert condition["type"] == "threshold" and condition["expression"] in refs, uid
        for d in rule["data"]:
            assert d["datasourceUid"] in ("__expr__", datasource["uid"]), uid
            assert d["model"]["refId"] == d["refId"], uid
        assert rule["noDataState"] == "OK" and rule["execErrState"] == "Error", uid
        assert rule["annotations"]["summary"] and rule["labels"]["severity"], uid
    kinds = {k for rule in rules.values() for k in re.findall(r"'(\w+)'", query_of(rule)[0])}
    assert {"latency_regression", "data_drift", "prediction_drift", "fidelity_drop"} <= kinds
    assert kinds - {"resolved", "dropped_"} <= set(KINDS)


def _seed_alert_rows(db: Database) -> None:
    now = utcnow()
    hour_ago = now - timedelta(hours=1)
    events = [  # (kind, version, arm, status)
        ("latency_regression", "v2", "main", "open"),
        ("latency_regression", "v1", "main", "resolved"),
        ("data_drift", "v2", "", "acknowledged"),
        ("prediction_drift", "v2", "", "resolved"),
        ("fidelity_drop", "v3", "", "open"),
    ]
    counters = [  # (instance, host, name, value, updated)
        ("a", "web-1", "dropped_queue_full", 5, now),
        ("b", "web-2", "dropped_queue_full", 3, hour_ago),  # a process gone an hour ago
        ("a", "web-1", "internal_errors", 2, now),  # not a drop
    ]
    with db.session() as s:
        for i, (kind, version, arm, status) in enumerate(events):
            s.add(schema.Event(
                kind=kind, model="clf", version=version, arm=arm, condition=f"c{i}",
                severity="warning", summary=kind, details={}, status=status, opened_at=hour_ago,
                updated_at=now, resolved_at=now if status == "resolved" else None,
            ))  # fmt: skip
        for instance, host, name, value, updated in counters:
            s.add(schema.TelemetryCounter(instance_id=instance, host=host, name=name,
                                          value=value, updated_at=updated))  # fmt: skip


def firing(db: Database, rule: dict[str, Any]) -> set[tuple[str, ...]]:
    """The label sets the rule fires for: its SQL expanded as Grafana does, then threshold."""
    text, seconds = query_of(rule)
    end = utcnow()
    query = expand(text, QueryContext(end - timedelta(seconds=seconds), end))
    (threshold,) = [d["model"] for d in rule["data"] if d["model"].get("type") == "threshold"]
    (evaluator,) = [c["evaluator"] for c in threshold["conditions"]]
    assert evaluator["type"] == "gt"
    with db.engine.connect() as conn:
        result = conn.exec_driver_sql(query)
        columns = list(result.keys())
        rows = result.all()
    assert columns[-1] == "value" and all(isinstance(r[-1], float) for r in rows)
    return {tuple(str(v) for v in r[:-1]) for r in rows if r[-1] > evaluator["params"][0]}


def test_every_alert_rule_fires_on_its_condition_in_postgresql(pg_url: str) -> None:
    storage.upgrade(storage.create_db_engine(pg_url))
    db = Database(pg_url)
    try:
        rules = alert_rules()
        assert {uid: firing(db, rule) for uid, rule in rules.items()} == dict.fromkeys(rules, set())
        _seed_alert_rows(db)
        assert {uid: firing(db, rule) for uid, rule in rules.items()} == {
            "tunewatch-latency-regression": {("clf", "v2", "main")},
            "tunewatch-drift": {("clf", "v2", "data_drift")},
            "tunewatch-fidelity-drop": {("clf", "v3")},
            "tunewatch-telemetry-drops": {("web-1", "queue_full")},
        }
    finally:
        db.dispose()
