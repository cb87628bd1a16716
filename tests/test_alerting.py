"""Alerts that reach people: webhook bodies chat tools accept, and the Grafana alert rules."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from monitor.events import EventRecord, Notifier
from monitor.storage import utcnow


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
