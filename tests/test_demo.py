"""``tunewatch demo`` end to end on SQLite, at a faster pace, as a newcomer runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.cli import main


def test_demo_runs_the_whole_loop_and_leaves_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default database and artifacts land here
    assert main(["demo", "--yes", "--pace", "0.35"]) == 0
    out = capsys.readouterr().out
    for step in ("1/8", "4/8 detecting", "5/8 retuning", "6/8 experiment", "7/8 promotion"):
        assert step in out
    assert "applied by demo --yes" in out and "tunewatch demo: what happened" in out
    assert (tmp_path / "tunewatch.db").exists()
    assert main(["promotions", "--json"]) == 0
    (promotion,) = json.loads(capsys.readouterr().out)["promotions"]
    assert promotion["status"] == "applied" and promotion["evidence"]["arms"]["challenger"]["calls"]
    assert main(["status", "--json", "--window", "1h"]) == 0
    versions = {m["version"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert {"v1", promotion["to_version"]} <= versions
    assert main(["events", "--json"]) == 0
    kinds = {e["kind"] for e in json.loads(capsys.readouterr().out)["events"]}
    assert "data_drift" in kinds
