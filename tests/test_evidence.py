"""One verdict per guardrail: the words, statuses and intervals every reader is shown."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_web import _store_minutes, _tuned_candidate

from monitor.events import Notifier
from monitor.sequential import ErrorRateTest
from monitor.settings import Settings
from monitor.stats import latency_effect
from monitor.storage import Database
from tuner import evidence, experiments
from tuner.analysis import run_analysis


def test_too_few_calls_or_comparisons_is_insufficient_data_never_a_pass() -> None:
    errors = ErrorRateTest(min_samples=30).update(400, 1, 22, 0).to_dict()
    assert evidence.errors_verdict(errors, 30, 0.95) == {
        "guardrail": "errors", "status": "insufficient_data", "effect": None,
        "text": "insufficient data: 22 of 30 calls in the challenger arm",
    }  # fmt: skip
    shadow = {"source": "shadow", "compared": 22, "agreed": 22, "rate": 1.0}
    few = evidence.agreement_verdict(shadow, {}, min_samples=30, min_rate=0.98, confidence=0.95)
    assert (few["status"], few["text"]) == (
        "insufficient_data", "insufficient data: 22 of 30 shadow comparisons"
    )  # fmt: skip
    rng = np.random.default_rng(0)
    lat = latency_effect(rng.lognormal(1, 0.2, 500), rng.lognormal(1, 0.2, 12)).to_dict()
    assert evidence.latency_verdict(lat)["status"] == "insufficient_data"


@pytest.mark.parametrize(
    ("agreed", "status", "head"),
    [
        (299, "pass", "challenger agrees with the champion: 299 of 300 shadow calls (99.67 % "
                      "[98.14 %, 99.94 %], 95 % CI; at least 98 % needed)"),
        (280, "breach", "challenger disagrees: 280 of 300 shadow calls (93.33 %"),
    ],
)  # fmt: skip
def test_shadow_agreement_reads_as_one_rate_with_its_interval(
    agreed: int, status: str, head: str
) -> None:
    shadow = {"source": "shadow", "compared": 300, "agreed": agreed}
    v = evidence.agreement_verdict(shadow, {}, min_samples=100, min_rate=0.98, confidence=0.95)
    assert v["status"] == status and v["text"].startswith(head), v["text"]
    lo, hi = v["effect"]["ci"]
    assert lo < v["effect"]["estimate"] < hi


def test_an_error_rate_verdict_prints_counts_as_integers() -> None:
    errors = ErrorRateTest(min_samples=100).update(5000, 50, 5000, 110).to_dict()
    v = evidence.errors_verdict(errors, 100, 0.95)
    assert v["status"] == "breach"
    assert v["text"].startswith(
        "challenger errs more: 50 of 5,000 -> 110 of 5,000 calls (1.00 % -> 2.20 %), "
        "difference +1.20 pp ["
    )
    assert "(95 % CS), mSPRT p=" in v["text"]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        _Hook.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook_url() -> Iterator[str]:
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_the_promotion_notification_carries_the_three_verdicts(
    sqlite_url: str, tmp_path: Path, hook_url: str
) -> None:
    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(sqlite_url)
    _tuned_candidate(db, settings, tmp_path)
    exp = experiments.start(db, "clf", "v2", share=0.5, min_samples=200)
    first = exp.started_at + timedelta(seconds=1)
    _store_minutes(db, "v1", "champion", first, [(240, 0, 3.1)] * 5)
    _store_minutes(db, "v2", "challenger", first, [(236, 0, 2.3)] * 5)
    (verdict,) = run_analysis(db, settings, notifier=Notifier(hook_url, retries=0),
                              now=exp.started_at + timedelta(minutes=6))  # fmt: skip
    assert verdict.decision == "promote"
    (body,) = _Hook.received
    lines = evidence.lines(verdict.evidence)
    assert [line.split(":")[0] for line in lines] == ["latency", "errors", "agreement"]
    assert body["message"] == f"promotion {verdict.promotion_id} of clf:v2 is pending: " + (
        "; ".join(lines)
    )
    assert body["text"].startswith(
        f"[tunewatch] promotion {verdict.promotion_id} of clf:v2 is pending: latency: [pass] "
        "challenger faster: median x1.3"
    )
    assert (
        "Mann-Whitney p &lt; 1e-100; errors: [pass] no significant difference: 0 of 1,200 "
        in (body["text"])
    )
    db.dispose()
