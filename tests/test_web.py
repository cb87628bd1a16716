"""The promotions page in a real headless Chromium, served by the real API server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_server import TOKEN, request_promotion, running_api, seed_model, without_auth

from monitor.registry import champion, get_version
from monitor.settings import Settings
from monitor.storage import Database
from tuner import promotions

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PLOT_LOADED = """() => [...document.querySelectorAll('img[data-plot]')]
    .every((img) => img.complete && img.naturalWidth > 0)"""


def _require_browser() -> Any:
    """The Playwright module; skip (outside CI) or fail (CI=true) without it or Chromium."""
    problem = None if os.path.exists(CHROMIUM) else f"{CHROMIUM} is not installed"
    try:
        from playwright import sync_api
    except ImportError as exc:
        problem, sync_api = f"playwright is not importable: {exc}", None
    if problem is None:
        return sync_api
    if IN_CI:
        pytest.fail(problem + " (CI=true: browser tests must run; apt-get install chromium)")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = _require_browser()
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def settings(sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"), api_token=TOKEN
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def console_errors() -> list[str]:
    """Script errors and CSP violations the page logged (HTTP error statuses left out)."""
    return []


@pytest.fixture
def page(browser: Any, console_errors: list[str]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)

    def on_console(message: Any) -> None:
        # 401/409 answers are expected here and Chromium logs each as "Failed to load resource".
        if message.type == "error" and "Failed to load resource" not in message.text:
            console_errors.append(message.text)

    tab.on("console", on_console)
    tab.on("pageerror", lambda exc: console_errors.append(str(exc)))
    yield tab
    context.close()


def _open_with_token(page: Any, url: str) -> None:
    page.goto(url)
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Use token").click()


def _cell(page: Any, arm: str, column: int) -> str:
    return str(page.locator(f'tr[data-arm="{arm}"] td').nth(column).inner_text())


def test_approve_from_the_page_makes_the_challenger_champion(
    page: Any, settings: Settings, db: Database, tmp_path: Path, console_errors: list[str]
) -> None:
    seed_model(db, settings, tmp_path, "clf")
    pid = request_promotion(db, "clf")
    with running_api(settings, db) as url:
        page.goto(url)
        page.get_by_text("invalid bearer token").or_(page.get_by_text("missing bearer")).wait_for()
        _open_with_token(page, url)
        card = page.locator(f'article[data-promotion="{pid}"]')
        card.wait_for()
        assert "clf: v1 → v2" in card.locator("h3").inner_text()
        champion_row = [_cell(page, "champion", i) for i in range(7)]
        assert champion_row == ["v1", "1,200", "3", "0.25 %", "4.10", "7.90", "9.50"]
        assert _cell(page, "challenger", 0) == "v2" and _cell(page, "challenger", 5) == "4.40"
        fields = {
            f: page.locator(f'[data-field="{f}"]').inner_text()
            for f in ("latency.median_ratio", "latency.median_ci", "error_rate.p_value",
                      "agreement.rate", "agreement.source")
        }  # fmt: skip
        assert fields == {
            "latency.median_ratio": "0.561", "latency.median_ci": "[0.540, 0.580]",
            "error_rate.p_value": "0.6100", "agreement.rate": "99.67 %",
            "agreement.source": "shadow",
        }  # fmt: skip
        page.wait_for_function(PLOT_LOADED)
        page.screenshot(path=str(tmp_path / "promotions.png"), full_page=True)

        card.get_by_role("button", name="Approve v2").click()
        assert "Enter your name first" in card.locator(".result").inner_text()
        card.get_by_label("Your name").fill("Ana")
        card.get_by_label("Note").fill("p95 halves")
        card.get_by_role("button", name="Approve v2").click()
        message = page.get_by_role("status").filter(has_text="approved by Ana")
        message.wait_for()
        assert "clf v2 is now champion (status applied)" in message.inner_text()
        page.get_by_text("No pending promotions.").wait_for()
        recent = page.locator(f'#recent tr[data-promotion="{pid}"]').inner_text()
        assert "applied" in recent and "Ana" in recent and "p95 halves" in recent
        page.screenshot(path=str(tmp_path / "approved.png"), full_page=True)
    assert champion(db, "clf").version == "v2"
    assert promotions.get(db, pid).decided_by == "Ana"
    assert console_errors == []


def test_reject_from_the_page_and_a_lost_race_shows_the_conflict(
    page: Any, settings: Settings, db: Database, tmp_path: Path, console_errors: list[str]
) -> None:
    seed_model(db, settings, tmp_path, "clf", versions=3)
    first = request_promotion(db, "clf", "v2")
    with running_api(settings, db) as url:
        _open_with_token(page, url)
        card = page.locator(f'article[data-promotion="{first}"]')
        card.get_by_label("Your name").fill("Bo")
        card.get_by_role("button", name="Reject v2").click()
        page.get_by_role("status").filter(has_text="rejected by Bo").wait_for()
        assert get_version(db, "clf", "v2").status == "rejected"

        second = request_promotion(db, "clf", "v3")
        page.get_by_role("button", name="Refresh").click()
        card = page.locator(f'article[data-promotion="{second}"]')
        card.get_by_label("Your name").fill("Bo")
        promotions.approve(db, second, by="Cy")  # someone else decides first
        card.get_by_role("button", name="Reject v3").click()
        conflict = page.get_by_role("status").filter(has_text="Someone else decided first")
        conflict.wait_for()
        assert f"promotion {second} was already decided: applied by Cy" in conflict.inner_text()
    assert champion(db, "clf").version == "v3"
    assert console_errors == []


def test_page_works_without_a_token_when_auth_is_disabled(
    page: Any, settings: Settings, db: Database, tmp_path: Path, console_errors: list[str]
) -> None:
    seed_model(db, settings, tmp_path, "clf")
    pid = request_promotion(db, "clf")
    with running_api(without_auth(settings.replace(api_token="")), db) as url:
        page.goto(url)
        page.locator(f'article[data-promotion="{pid}"]').wait_for()
        page.wait_for_function(PLOT_LOADED)
        assert not page.get_by_label("API token").is_visible()
    assert console_errors == []
