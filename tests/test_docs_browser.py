"""/docs in a real headless Chromium: Swagger UI renders offline, under its CSP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api_server import TOKEN, running_api
from test_web import CHROMIUM, CHROMIUM_ARGS, _require_browser

from monitor.settings import Settings
from monitor.storage import Database


def test_docs_render_the_operations_offline_under_the_csp(sqlite_url: str, tmp_path: Path) -> None:
    sync_api = _require_browser()
    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path), api_token=TOKEN)
    db = Database(sqlite_url)
    problems: list[str] = []
    outside: list[str] = []
    try:
        with running_api(settings, db) as url, sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()

            def on_request(request: Any) -> None:
                if not request.url.startswith((url, "data:")):
                    outside.append(request.url)

            page.on("request", on_request)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.goto(f"{url}/docs")
            page.locator(".opblock").first.wait_for(timeout=30_000)
            summaries = page.locator(".opblock-summary-path").all_inner_texts()
            title = page.locator(".info .title").first.inner_text()
            browser.close()
    finally:
        db.dispose()
    assert "tunewatch" in title
    assert "/api/promotions/{promotion_id}/approve" in [s.replace("\u200b", "") for s in summaries]
    assert len(summaries) == 9
    assert outside == [] and problems == []
