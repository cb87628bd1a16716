"""Schemathesis against the API's own /openapi.json on a real server: no 5xx, no schema gaps.

The run is bounded (a fixed seed and a few examples per operation) to stay within about a
minute on a busy 2-core machine; every check schemathesis has is on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_server import TOKEN, request_promotion, running_api, seed_model

from monitor.settings import Settings
from monitor.storage import Database

MAX_EXAMPLES = 20
RUN_ST = "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"


@pytest.fixture
def url(db_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        database_url=db_url, artifacts_dir=str(tmp_path / "artifacts"), api_token=TOKEN
    )
    db = Database(db_url)
    for name in ("clf", "reg"):  # promotions 1 and 2 exist: some cases reach the decisions
        seed_model(db, settings, tmp_path, name)
        request_promotion(db, name)
    try:
        with running_api(settings, db) as base:
            yield base
    finally:
        db.dispose()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    url: str, tmp_path: Path
) -> None:
    report = tmp_path / "schemathesis.json"
    command = [
        sys.executable, "-c", RUN_ST, "run", f"{url}/openapi.json",
        "--header", f"Authorization: Bearer {TOKEN}", "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--workers", "1",
        "--request-timeout", "30", "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = json.loads(report.read_text())
    failures = summary["test_cases"]["with_failures"]
    print(f"schemathesis: {summary['test_cases']['generated']} cases, {failures} with failures")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert summary["operations"]["tested"] == summary["operations"]["total"] == 9
    assert summary["test_cases"]["generated"] >= 200
    assert failures == 0 and summary["failures"] == [] and summary["errors"] == []
