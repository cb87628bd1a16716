"""The HTTP API as clients see it: a real uvicorn server, real rows, real HTTP."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from api_server import (
    EVIDENCE,
    TOKEN,
    request_promotion,
    running_api,
    seed_model,
    without_auth,
)
from prometheus_client.parser import text_string_to_metric_families

from monitor import schema
from monitor.registry import champion, get_version
from monitor.settings import Settings
from monitor.storage import Database, utcnow
from tuner import experiments, promotions
from tuner.api import check_bind, create_app, latency_png
from tuner.errors import TunerError

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Api:
    """A running API, its database and settings."""

    url: str
    db: Database
    settings: Settings
    tmp: Path

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        artifacts_dir=str(tmp_path / "artifacts"),
        api_token=TOKEN,
        promotion_watch_s=600,
    )  # not the library default: the API must pass it


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def api(settings: Settings, db: Database, tmp_path: Path) -> Iterator[Api]:
    with running_api(settings, db) as url:
        yield Api(url, db, settings, tmp_path)


def test_api_routes_need_the_bearer_token(api: Api) -> None:
    with api.client(token=None) as c:
        missing = c.get("/api/promotions")
        basic = c.get("/api/promotions", headers={"Authorization": "Basic dXNlcjpwdw=="})
        wrong = c.get("/api/promotions", headers={"Authorization": "Bearer nope"})
        right = c.get("/api/promotions", headers=AUTH)
        health, page = c.get("/healthz"), c.get("/")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in missing.json()["detail"]
    assert basic.status_code == 401
    assert wrong.status_code == 403 and "invalid bearer token" in wrong.json()["detail"]
    assert right.status_code == 200 and right.json() == {"promotions": []}
    assert health.json() == {"status": "ok"}
    assert page.status_code == 200 and 'data-auth="on"' in page.text
    nonce = page.headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in page.text and "__NONCE__" not in page.text
    assert page.headers["x-frame-options"] == "DENY"


def test_every_api_route_is_protected(api: Api) -> None:
    paths = ["/api/promotions", "/api/promotions/1", "/api/promotions/1/latency.png",
             "/api/experiments", "/api/audit"]  # fmt: skip
    with api.client(token=None) as c:
        codes = [c.get(p).status_code for p in paths]
        codes += [c.post(f"/api/promotions/1/{a}", json={"by": "x"}).status_code
                  for a in ("approve", "reject")]  # fmt: skip
    assert codes == [401] * 7


def test_approve_makes_the_challenger_champion_once(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf")
    pid = request_promotion(api.db, "clf")
    with api.client() as c:
        pending = c.get("/api/promotions", params={"status": "pending"}).json()["promotions"]
        approved = c.post(f"/api/promotions/{pid}/approve", json={"by": "ana", "note": "faster"})
        again = c.post(f"/api/promotions/{pid}/approve", json={"by": "bo"})
        rejected_late = c.post(f"/api/promotions/{pid}/reject", json={"by": "bo"})
        one = c.get(f"/api/promotions/{pid}").json()
        entries = c.get("/api/audit", params={"model": "clf"}).json()["entries"]
    assert [p["id"] for p in pending] == [pid]
    assert pending[0]["evidence"]["arms"]["champion"]["p95_ms"] == 7.9
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert (body["status"], body["decided_by"], body["note"]) == ("applied", "ana", "faster")
    assert champion(api.db, "clf").version == "v2"
    assert again.status_code == 409 and rejected_late.status_code == 409
    assert again.json()["detail"].startswith(f"promotion {pid} was already decided: applied by ana")
    assert one["status"] == "applied"
    applied, until = (datetime.fromisoformat(one[k]) for k in ("applied_at", "watch_until"))
    assert until - applied == timedelta(seconds=api.settings.promotion_watch_s)
    assert "promotion_approved" in [e["action"] for e in entries]


def test_reject_keeps_the_champion(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf")
    pid = request_promotion(api.db, "clf")
    with api.client() as c:
        rejected = c.post(f"/api/promotions/{pid}/reject", json={"by": "ana", "note": "risky"})
        listed = c.get("/api/promotions", params={"status": "rejected", "model": "clf"}).json()
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert [p["id"] for p in listed["promotions"]] == [pid]
    assert champion(api.db, "clf").version == "v1"
    assert get_version(api.db, "clf", "v2").status == "rejected"


def test_concurrent_approve_and_reject_give_one_decision(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf")
    pid = request_promotion(api.db, "clf")
    codes: dict[str, int] = {}

    def decide(action: str) -> None:
        with api.client() as c:
            codes[action] = c.post(
                f"/api/promotions/{pid}/{action}", json={"by": action}
            ).status_code

    threads = [threading.Thread(target=decide, args=(a,)) for a in ("approve", "reject")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes.values()) == [200, 409]
    winner = promotions.get(api.db, pid)
    assert winner.decided_by == next(a for a, code in codes.items() if code == 200)


def test_bad_requests_name_the_problem(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf")
    pid = request_promotion(api.db, "clf")
    with api.client() as c:
        unknown = c.get("/api/promotions/9999")
        unknown_approve = c.post("/api/promotions/9999/approve", json={"by": "ana"})
        unknown_plot = c.get("/api/promotions/9999/latency.png")
        no_by = c.post(f"/api/promotions/{pid}/approve", json={"note": "x"})
        empty_by = c.post(f"/api/promotions/{pid}/approve", json={"by": ""})
        blank_by = c.post(f"/api/promotions/{pid}/approve", json={"by": "   "})
        bad_status = c.get("/api/promotions", params={"status": "maybe"})
        bad_id = c.get("/api/promotions/abc")
        bad_limit = c.get("/api/audit", params={"limit": 0})
    assert (
        unknown.status_code == 404 and "promotion 9999 does not exist" in unknown.json()["detail"]
    )
    assert unknown_approve.status_code == 404 and unknown_plot.status_code == 404
    assert no_by.status_code == 422 and empty_by.status_code == 422
    assert blank_by.status_code == 400 and "name of who makes it" in blank_by.json()["detail"]
    assert bad_status.status_code == 422 and "maybe" in str(bad_status.json()["detail"])
    assert bad_id.status_code == 422 and bad_limit.status_code == 422
    assert promotions.get(api.db, pid).status == "pending"  # nothing was decided by bad input


def test_corrupted_challenger_artifact_cannot_be_approved(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf")
    pid = request_promotion(api.db, "clf")
    Path(get_version(api.db, "clf", "v2").artifact_path).write_bytes(b"not the registered model")
    with api.client() as c:
        r = c.post(f"/api/promotions/{pid}/approve", json={"by": "ana"})
    assert r.status_code == 400 and "sha256" in r.json()["detail"]
    assert champion(api.db, "clf").version == "v1"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_latency_plot_is_a_png_for_any_evidence(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf", versions=4)
    timeline = request_promotion(api.db, "clf")
    bars_evidence = {k: v for k, v in EVIDENCE.items() if k != "timeline"}
    promotions.reject(api.db, timeline, by="t")
    bars = promotions.request(api.db, "clf", "v3", evidence=bars_evidence).id
    promotions.reject(api.db, bars, by="t")
    empty = promotions.request(api.db, "clf", "v4", evidence={}).id
    with api.client() as c:
        responses = [c.get(f"/api/promotions/{i}/latency.png") for i in (timeline, bars, empty)]
    for r in responses:
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert _png_size(r.content) == (800, 360)
    assert len(responses[0].content) != len(responses[2].content)  # lines vs. "no numbers"


def test_experiments_and_audit_are_listed(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf")
    exp = experiments.start(api.db, "clf", "v2", share=0.25, by="ana")
    with api.client() as c:
        running = c.get("/api/experiments", params={"status": "running"}).json()["experiments"]
        other = c.get("/api/experiments", params={"model": "other"}).json()["experiments"]
        entries = c.get("/api/audit", params={"limit": 1}).json()["entries"]
    assert [(e["id"], e["challenger_version"], e["share"]) for e in running] == [
        (exp.id, "v2", 0.25)
    ]
    assert other == []
    assert [(e["action"], e["actor"]) for e in entries] == [("experiment_started", "ana")]


def test_openapi_documents_the_bearer_scheme_and_routes(api: Api) -> None:
    with api.client(token=None) as c:
        doc = c.get("/openapi.json").json()
    assert doc["info"]["title"] == "tunewatch" and "promotion" in doc["info"]["description"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "The `api_token` setting "
        "(TUNEWATCH_API_TOKEN).",
    }  # fmt: skip
    approve = doc["paths"]["/api/promotions/{promotion_id}/approve"]["post"]
    assert approve["security"] == [{"bearerAuth": []}]
    assert approve["summary"] == "Approve a pending promotion"
    assert {"401", "403", "404", "409", "422"} <= set(approve["responses"])
    assert "PromotionOut" in doc["components"]["schemas"]
    assert "security" not in doc["paths"]["/metrics"]["get"]
    assert set(doc["paths"]) >= {
        "/healthz", "/metrics", "/api/promotions", "/api/promotions/{promotion_id}",
        "/api/promotions/{promotion_id}/reject", "/api/promotions/{promotion_id}/latency.png",
        "/api/experiments", "/api/audit",
    }  # fmt: skip


def _seed_metrics_rows(db: Database) -> None:
    now = utcnow()
    with db.session() as s:
        for slot, status in enumerate(["success", "success", "failed"]):
            s.add(schema.JobRun(job_id="latency_detection", slot=slot, instance="t",
                                started_at=now, status=status))  # fmt: skip
        s.add(schema.JobRun(job_id="retune", slot=0, instance="t", started_at=now,
                            status="success"))  # fmt: skip
        for instance, value in (("a", 5), ("b", 7)):
            s.add(schema.TelemetryCounter(instance_id=instance, name="dropped_queue_full",
                                          value=value, updated_at=now))  # fmt: skip
        s.add(schema.TelemetryCounter(instance_id="a", name="internal_errors", value=9,
                                      updated_at=now))  # fmt: skip
        s.add(schema.Event(kind="latency_regression", model="clf", version="v1", condition="c1",
                           severity="warning", summary="slow", details={}, status="open",
                           opened_at=now, updated_at=now))  # fmt: skip
        for start, calls in ((now - timedelta(minutes=1), 40), (now - timedelta(hours=1), 999)):
            s.add(schema.LatencyAggregate(
                instance_id="a", model="clf", version="v1", arm="main", interval_start=start,
                interval_s=10, calls=calls, errors=2, items=calls, sum_ms=1.0, min_ms=0.1,
                max_ms=1.0, p50_ms=0.5, p95_ms=0.9, p99_ms=1.0, buckets={}, error_types={},
                updated_at=now,
            ))  # fmt: skip


def test_metrics_report_the_database_state(api: Api) -> None:
    seed_model(api.db, api.settings, api.tmp, "clf")
    request_promotion(api.db, "clf")
    _seed_metrics_rows(api.db)
    with api.client(token=None) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    assert samples[("tunewatch_database_up", ())] == 1
    assert samples[("tunewatch_job_runs_total", (("job", "latency_detection"),))] == 3
    assert samples[("tunewatch_job_failures_total", (("job", "latency_detection"),))] == 1
    assert samples[("tunewatch_job_failures_total", (("job", "retune"),))] == 0
    assert samples[("tunewatch_telemetry_dropped_total", (("reason", "queue_full"),))] == 12
    assert not any(k[0] == "tunewatch_telemetry_dropped_total" and ("reason", "internal_errors")
                   in k[1] for k in samples)  # fmt: skip
    assert samples[("tunewatch_promotions", (("status", "pending"),))] == 1
    assert samples[("tunewatch_promotions", (("status", "applied"),))] == 0
    key = (("kind", "latency_regression"), ("status", "open"))
    assert samples[("tunewatch_events", key)] == 1
    arm = (("arm", "main"), ("model", "clf"), ("version", "v1"))
    assert samples[("tunewatch_recent_calls", arm)] == 40  # the hour-old interval is left out
    assert samples[("tunewatch_recent_errors", arm)] == 2


def test_auth_disabled_serves_without_a_token(settings: Settings, db: Database) -> None:
    no_token = without_auth(settings.replace(api_token=""))
    with running_api(no_token, db) as url, httpx.Client(base_url=url, timeout=30) as c:
        listed, page = c.get("/api/promotions"), c.get("/")
    assert listed.status_code == 200 and 'data-auth="off"' in page.text


def test_without_a_configured_token_every_request_is_refused(
    settings: Settings, db: Database
) -> None:
    with running_api(settings.replace(api_token=""), db) as url, httpx.Client(base_url=url) as c:
        r = c.get("/api/promotions", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "TUNEWATCH_API_TOKEN" in r.json()["detail"]


def test_check_bind_refuses_unsafe_combinations() -> None:
    no_token = Settings(api_token="")
    with pytest.raises(TunerError, match="no api_token configured.*'0.0.0.0'"):
        check_bind(no_token, "0.0.0.0")
    with pytest.raises(TunerError, match="TUNEWATCH_API_AUTH_DISABLED=true"):
        check_bind(no_token, "127.0.0.1")  # localhost alone is not enough: disable explicitly
    with pytest.raises(TunerError, match="only allowed when binding 127.0.0.1, not host '0.0.0.0'"):
        check_bind(without_auth(no_token), "0.0.0.0")
    with pytest.raises(TunerError, match="only allowed when binding 127.0.0.1"):
        check_bind(without_auth(Settings(api_token=TOKEN)), "10.0.0.5")
    check_bind(without_auth(no_token), "127.0.0.1")
    check_bind(Settings(api_token=TOKEN), "0.0.0.0")


def test_latency_plot_survives_malformed_evidence() -> None:
    odd = {"timeline": ["x", {"t": "not a time"}, {"t": "2026-11-28T18:00:00+00:00"}],
           "arms": {"champion": "nope", "challenger": {"p50_ms": True}}}  # fmt: skip
    assert _png_size(latency_png(odd, "odd")) == (800, 360)


def test_app_opens_its_own_database_from_the_settings(settings: Settings, db: Database) -> None:
    from fastapi.testclient import TestClient

    app = create_app(settings)
    with TestClient(app) as c:
        r = c.get("/api/promotions", headers=AUTH)
    assert r.status_code == 200 and app.state.owns_db and app.state.db is not db


def test_metrics_export_recent_latency_histograms_per_arm(api: Api) -> None:
    from monitor import sketch

    now = utcnow()
    rows = [  # (instance, arm, minutes ago, latencies in ms)
        ("a", "champion", 1, [2.0] * 45 + [40.0] * 5),
        ("b", "champion", 2, [2.0] * 45 + [40.0] * 5),  # a second process: merged exactly
        ("a", "challenger", 1, [1.0] * 20),
        ("a", "champion", 60, [900.0] * 500),  # an hour old: outside the window, not read
    ]
    with api.db.session() as s:
        for instance, arm, ago, latencies in rows:
            buckets: dict[str, int] = {}
            for ms in latencies:
                key = str(sketch.bucket_of(ms))
                buckets[key] = buckets.get(key, 0) + 1
            s.add(schema.LatencyAggregate(
                instance_id=instance, model="clf", version="v2", arm=arm,
                interval_start=now - timedelta(minutes=ago), interval_s=10, calls=len(latencies),
                errors=0, items=len(latencies), sum_ms=sum(latencies), min_ms=min(latencies),
                max_ms=max(latencies), p50_ms=0, p95_ms=0, p99_ms=0, buckets=buckets,
                error_types={}, updated_at=now,
            ))  # fmt: skip
    with api.client(token=None) as c:
        text = c.get("/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("tunewatch_recent_latency_ms")]  # fmt: skip
    got = {(s.name, s.labels["arm"], s.labels.get("le")): s.value for s in samples}
    assert got[("tunewatch_recent_latency_ms_bucket", "champion", "1.5")] == 0
    assert got[("tunewatch_recent_latency_ms_bucket", "champion", "2")] == 90
    assert got[("tunewatch_recent_latency_ms_bucket", "champion", "30")] == 90
    assert got[("tunewatch_recent_latency_ms_bucket", "champion", "50")] == 100
    assert got[("tunewatch_recent_latency_ms_bucket", "champion", "+Inf")] == 100
    assert got[("tunewatch_recent_latency_ms_gsum", "champion", None)] == 90 * 2.0 + 10 * 40.0
    assert got[("tunewatch_recent_latency_ms_bucket", "challenger", "1")] == 20
    assert got[("tunewatch_recent_latency_ms_gcount", "challenger", None)] == 20
    assert {s.labels["version"] for s in samples} == {"v2"}
