"""The promotions page in a real headless Chromium, served by the real API server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from api_server import TOKEN, request_promotion, running_api, seed_model, without_auth

from monitor import schema, sketch
from monitor.registry import champion, get_version
from monitor.settings import Settings
from monitor.storage import Database, utcnow
from tests.serving_models import tiny_onnx
from tuner import experiments, promotions, registry
from tuner.analysis import analyze, run_analysis
from tuner.evidence import latency_png

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


def _tuned_candidate(db: Database, settings: Settings, tmp_path: Path) -> None:
    """clf v1 (champion) and v2 from a stored tuning run, as ``tunewatch tune`` leaves them."""
    seed_model(db, settings, tmp_path, "clf", versions=1)
    now = utcnow()
    with db.session() as s:
        run = schema.TuningRun(
            model="clf", base_version="v1", status="done", slo_ms=20.0, objective="latency",
            started_at=now, finished_at=now, winner_version="v2", baseline_throughput=8385.0,
            winner_throughput=11320.0, speedup=1.35, outcome="registered", summary={},
        )  # fmt: skip
        s.add(run)
        s.flush()
        guard = {"top1_agreement": 0.995, "rows": 512}
        for name, kind, tput, winner in (("int8-dynamic", "quantized", 11320.0, True),
                                         ("incumbent", "incumbent", 8385.0, False)):  # fmt: skip
            s.add(schema.TuningTrial(
                run_id=run.id, name=name, config={"kind": kind}, batch_size=1, p50_ms=2.2,
                p95_ms=3.1, throughput=tput, accuracy=guard, passed=True, reason="",
                curve={}, is_winner=winner,
            ))  # fmt: skip
        run_id = run.id
    config = {"tuning_run": run_id, "candidate": "int8-dynamic", "runtime": {"threads": 1}}
    onnx_path = tiny_onnx(tmp_path / "clf-v2.onnx", scale=2.0)
    registry.register("clf", onnx_path, version="v2", config=config, db=db, settings=settings)


def _store_minutes(db: Database, version: str, arm: str, start: Any, spec: Any) -> None:
    """Per-minute latency histograms as a serving process writes them: (calls, errors, ms)."""
    rng = np.random.default_rng(len(arm))
    with db.session() as s:
        for minute, (calls, errors, median_ms) in enumerate(spec):
            ms = rng.lognormal(np.log(median_ms), 0.2, calls)
            hist: dict[str, int] = {}
            for b in sketch.buckets_of(ms):
                hist[str(int(b))] = hist.get(str(int(b)), 0) + 1
            s.add(schema.LatencyAggregate(
                instance_id="web-test", model="clf", version=version, arm=arm,
                interval_start=start + timedelta(minutes=minute), interval_s=60, calls=calls,
                errors=errors, items=calls, sum_ms=float(ms.sum()), min_ms=float(ms.min()),
                max_ms=float(ms.max()), p50_ms=0.0, p95_ms=0.0, p99_ms=0.0, buckets=hist,
                error_types={}, updated_at=utcnow(),
            ))  # fmt: skip


def test_approve_from_the_page_makes_the_challenger_champion(
    page: Any, settings: Settings, db: Database, tmp_path: Path, console_errors: list[str]
) -> None:
    _tuned_candidate(db, settings, tmp_path)
    exp = experiments.start(db, "clf", "v2", share=0.5, min_samples=200)
    # Calls in an interval that began before the experiment are never counted.
    _store_minutes(db, "v1", "champion", exp.started_at - timedelta(seconds=5), [(600, 9, 3.1)])
    first = exp.started_at + timedelta(seconds=1)
    _store_minutes(db, "v1", "champion", first, [(240, 1, 3.1)] * 2 + [(240, 0, 3.1)] * 3)
    _store_minutes(db, "v2", "challenger", first, [(236, 0, 2.3)] * 3 + [(236, 1, 2.3)] * 2)
    (verdict,) = run_analysis(db, settings, now=exp.started_at + timedelta(minutes=6))
    assert verdict.decision == "promote", verdict.reason
    pid = verdict.promotion_id
    with running_api(settings, db) as url:
        page.goto(url)
        page.get_by_text("invalid bearer token").or_(page.get_by_text("missing bearer")).wait_for()
        _open_with_token(page, url)
        card = page.locator(f'article[data-promotion="{pid}"]')
        card.wait_for()
        assert "clf: v1 → v2" in card.locator("h3").inner_text()
        champion_row = [_cell(page, "champion", i) for i in range(4)]
        assert champion_row == ["v1", "1,200", "2", "0.17 %"]  # integers print as integers
        assert [_cell(page, "challenger", i) for i in range(3)] == ["v2", "1,180", "2"]
        assert card.get_by_text("Guardrails (95 % confidence)").is_visible()
        boxes = {g: card.locator(f'[data-guardrail="{g}"]').inner_text()
                 for g in ("latency", "errors", "agreement")}  # fmt: skip
        assert boxes["latency"].startswith("Latency pass\n\nchallenger faster: median x1.3")
        p50s = _cell(page, "champion", 4), _cell(page, "challenger", 4)
        assert f"(95 % CI), p50 {p50s[0]} -> {p50s[1]} ms" in boxes["latency"]  # one p50
        assert "Mann-Whitney p < 1e-100" in boxes["latency"]
        assert boxes["errors"].startswith(
            "Errors pass\n\nno significant difference: 2 of 1,200 -> 2 of 1,180 calls (0.17 % -> "
            "0.17 %)"
        )
        assert boxes["agreement"].startswith(
            "Agreement not judged\n\nnot judged: no raw inputs stored for either arm"
        )
        tuning = card.locator("[data-tuning]").inner_text()
        assert "tuning run" in tuning.lower()
        assert "source v1, objective latency, SLO 20 ms" in tuning
        assert "speed-up x1.35 over the incumbent" in tuning
        winner = card.locator('tr[data-trial="winner"]').inner_text().split("\t")
        assert winner[:4] == ["winner", "int8-dynamic", "passed", "top1 agreement 0.9950, rows 512"]
        assert winner[6] == "11,320"
        card.get_by_text("Winner's config").click()
        assert "candidate int8-dynamic" in card.locator("ul.config").inner_text()
        page.wait_for_function(PLOT_LOADED)
        page.screenshot(path=str(tmp_path / "promotions.png"), full_page=True)
        assert (tmp_path / "promotions.png").stat().st_size > 10_000

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
        decided = promotions.get(db, pid).decided_at
        assert decided is not None
        assert "applied" in recent and "Ana" in recent and "p95 halves" in recent
        assert f"{decided:%Y-%m-%d %H:%M:%S} UTC" in recent  # who decided, and when
        page.screenshot(path=str(tmp_path / "approved.png"), full_page=True)
    assert champion(db, "clf").version == "v2"
    assert promotions.get(db, pid).decided_by == "Ana"
    assert console_errors == []


def test_the_plot_reads_minutes_since_the_experiment_started(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    _tuned_candidate(db, settings, tmp_path)
    exp = experiments.start(db, "clf", "v2", share=0.5, min_samples=200)
    first = exp.started_at + timedelta(seconds=1)
    _store_minutes(db, "v1", "champion", first, [(240, 0, 3.1)] * 4)
    _store_minutes(db, "v2", "challenger", first, [(236, 0, 2.3)] * 4)
    verdict = analyze(db, settings, exp, now=exp.started_at + timedelta(minutes=5))
    timeline = verdict.evidence["timeline"]
    assert [(p["arm"], p["minute"], p["calls"]) for p in timeline if p["minute"] == 3] == [
        ("champion", 3, 240), ("challenger", 3, 236)
    ]  # fmt: skip
    png = latency_png(verdict.evidence, "clf")
    assert png.startswith(b"\x89PNG")


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
