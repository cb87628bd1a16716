"""``tunewatch demo`` end to end on SQLite, at a faster pace, as a newcomer runs it.

Every phase ends on counts (calls served, samples stored), never on a clock, so this test
holds on a machine whose cores are busy elsewhere (checked beside two ``yes > /dev/null``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tuner.cli import main


def test_demo_runs_the_whole_loop_and_leaves_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default database and artifacts land here
    assert main(["demo", "--yes", "--pace", "0.35"]) == 0
    out = capsys.readouterr().out
    for step in ("1/8", "2/8 serving", "3/8 injecting", "4/8 detecting", "5/8 retuning"):
        assert step in out
    assert "[data_drift] digits:v1 inputs drifted" in out
    assert "[latency_regression] digits:v1 [champion] latency regressed" in out
    assert "tunewatch demo: what happened" in out and (tmp_path / "tunewatch.db").exists()
    assert main(["events", "--json"]) == 0
    kinds = {e["kind"] for e in json.loads(capsys.readouterr().out)["events"]}
    assert {"data_drift", "latency_regression"} <= kinds  # what the demo claims it found
    assert main(["promotions", "--json"]) == 0
    promoted = json.loads(capsys.readouterr().out)["promotions"]
    if "no new version:" in out:  # the tuner's outcome no_change: said, and a clean end
        assert "the champion keeps serving and the demo ends here" in out and promoted == []
        return
    for step in ("6/8 experiment", "7/8 promotion", "8/8 promotion 1 applied by demo --yes"):
        assert step in out
    (promotion,) = promoted
    assert promotion["status"] == "applied"
    calls = int(re.search(r"promote after ([\d,]+) calls", out)[1].replace(",", ""))  # type: ignore[index]
    arms = promotion["evidence"]["arms"]
    assert arms["champion"]["calls"] + arms["challenger"]["calls"] == calls  # counted exactly
    latency = promotion["evidence"]["verdicts"][0]
    assert (latency["guardrail"], latency["status"]) == ("latency", "pass")
    assert latency["effect"]["direction"] == "faster"
    assert re.search(r"offline vs live speed-up +│ x[\d.]+ vs x[\d.]+: same direction", out)
    assert main(["status", "--json", "--window", "1h"]) == 0
    versions = {m["version"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert {"v1", promotion["to_version"]} <= versions
