"""The API against hostile clients: huge bodies, odd ids and text, foreign Host headers.

Every test talks HTTP (or raw sockets, where a client library would refuse to misbehave) to a
real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from api_server import TOKEN, request_promotion, running_api, seed_model, without_auth
from sqlalchemy import text

from monitor.settings import Settings
from monitor.storage import Database
from tuner.api import check_bind
from tuner.cli import main
from tuner.errors import TunerError

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CAP = 4096


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url, artifacts_dir=str(tmp_path / "artifacts"), api_token=TOKEN,
        api_max_body_bytes=CAP,
    )  # fmt: skip


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def url(settings: Settings, db: Database) -> Iterator[str]:
    with running_api(settings, db) as base:
        yield base


def raw_request(base: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` (and ``body``) on a raw socket; the status code and the response bytes."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_a_declared_huge_body_is_refused_before_it_is_read(url: str) -> None:
    declared = "POST /api/promotions/1/approve HTTP/1.1\nHost: 127.0.0.1\n" \
        "Content-Type: application/json\nContent-Length: 300000000\n"  # fmt: skip
    no_token, _ = raw_request(url, declared)  # not one byte of the 300 MB is sent
    too_big, body = raw_request(url, declared + f"Authorization: Bearer {TOKEN}\n")
    assert no_token == 401
    assert too_big == 413 and b"api_max_body_bytes" in body
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200  # the server is still there


def test_a_streamed_body_is_cut_at_the_cap(url: str, db: Database, tmp_path: Path) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"by": "ann", "note": "'
        for _ in range(total // 1024):
            yield b"x" * 1024
        yield b'"}'

    json_auth = {**AUTH, "Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers=json_auth, timeout=30) as c:
        over = c.post("/api/promotions/1/reject", content=chunks(64 * 1024))
        under = c.post("/api/promotions/1/reject", content=chunks(2048))
    assert "content-length" not in over.request.headers  # it went chunked
    assert over.status_code == 413
    assert under.status_code == 404  # read, parsed and answered: no promotion 1


@pytest.mark.parametrize("bad", ["9223372036854775808", "99999999999999999999999", "0", "-1"])
def test_ids_outside_the_database_range_get_422(url: str, bad: str) -> None:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        codes = {
            c.get(f"/api/promotions/{bad}").status_code,
            c.get(f"/api/promotions/{bad}/latency.png").status_code,
            c.post(f"/api/promotions/{bad}/approve", json={"by": "ann"}).status_code,
            c.post(f"/api/promotions/{bad}/reject", json={"by": "ann"}).status_code,
        }
        largest = c.get("/api/promotions/9223372036854775807")
    assert codes == {422}
    assert largest.status_code == 404


def test_nul_bytes_and_lone_surrogates_get_422(
    url: str, db: Database, settings: Settings, tmp_path: Path
) -> None:
    seed_model(db, settings, tmp_path, "clf")
    pid = request_promotion(db, "clf")
    surrogate = b'{"by": "ann\\ud800"}'
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        answers = [
            c.post(f"/api/promotions/{pid}/approve", json={"by": "a\x00nn"}),
            c.post(f"/api/promotions/{pid}/reject", json={"by": "ann", "note": "x\x00"}),
            c.post(
                f"/api/promotions/{pid}/approve",
                content=surrogate,
                headers={"Content-Type": "application/json"},
            ),  # fmt: skip
            c.get("/api/promotions", params={"model": "clf\x00"}),
            c.get("/api/experiments", params={"model": "\x00"}),
            c.get("/api/audit", params={"model": "a\x00b"}),
        ]
        still_pending = c.get(f"/api/promotions/{pid}").json()["status"]
    assert [r.status_code for r in answers] == [422] * 6
    assert answers[2].json()["detail"][0]["input"] == "ann\\ud800"  # echoed, escaped
    assert still_pending == "pending"


def test_status_filters_are_enums_for_both_lists(url: str) -> None:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        bad = [c.get(p, params={"status": "zzz"}) for p in ("/api/promotions", "/api/experiments")]
        good = [c.get("/api/promotions", params={"status": "pending"}),
                c.get("/api/experiments", params={"status": "running"})]  # fmt: skip
        spec = c.get("/openapi.json").json()
    assert [r.status_code for r in bad] == [422, 422]
    assert [r.status_code for r in good] == [200, 200]
    for path in ("/api/promotions", "/api/experiments"):
        (status,) = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "status"]
        assert "zzz" not in str(status["schema"]) and "enum" in str(status["schema"])


def test_database_errors_are_a_generic_500(
    url: str, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_log"))
    logged = caplog.at_level(logging.ERROR, logger="tunewatch.api")
    with logged, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        r = c.get("/api/audit", params={"model": "clf"})
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert detail.startswith("internal database error (reference ")
    for leak in ("audit_log", "SELECT", "clf", "postgres", "127.0.0.1", "sqlite", "test"):
        assert leak not in detail
    reference = detail.split("reference ")[1].split(")")[0]
    (line,) = [r.getMessage() for r in caplog.records if reference in r.getMessage()]
    assert "audit_log" in line  # the detail is in the server's log, under the reference


def test_without_auth_only_loopback_host_headers_pass(settings: Settings, db: Database) -> None:
    open_api = without_auth(settings.replace(api_token=""))
    with running_api(open_api, db) as base, httpx.Client(base_url=base, timeout=30) as c:
        port = urlsplit(base).port
        rebound = c.get("/api/promotions", headers={"Host": f"evil.example:{port}"})
        page = c.get("/", headers={"Host": "evil.example"})
        hosts = (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "LOCALHOST")
        local = [c.get("/api/promotions", headers={"Host": h}).status_code for h in hosts]
    assert rebound.status_code == 400 and "'evil.example:" in rebound.json()["detail"]
    assert page.status_code == 400
    assert local == [200] * 4


def test_short_tokens_are_refused_at_start_up(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(TunerError, match="api_token is 5 characters long.*at least 16"):
        check_bind(Settings(api_token="short"), "127.0.0.1")
    check_bind(Settings(api_token="x" * 16), "0.0.0.0")
    monkeypatch.setenv("TUNEWATCH_API_TOKEN", "123456789012345")
    code = main(["serve", "--database-url", f"sqlite:///{tmp_path}/t.db"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert err.startswith("error: api_token is 15 characters long")


def test_docs_are_served_from_the_package_with_a_csp(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        docs = c.get("/docs")
        script = c.get("/docs/assets/swagger-ui-bundle.js")
        css = c.get("/docs/assets/swagger-ui.css")
    csp = docs.headers["content-security-policy"]
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert docs.status_code == 200 and f'nonce="{nonce}"' in docs.text
    assert "default-src 'none'" in csp and "https:" not in csp and "http" not in docs.text
    assert script.status_code == 200 and b"SwaggerUIBundle" in script.content
    assert css.status_code == 200
