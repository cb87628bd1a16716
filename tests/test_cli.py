"""The ``tunewatch`` command line: output, JSON shape and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monitor import Monitor
from tuner.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_db_commands_move_between_revisions(
    capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    code, out, _ = _run(capsys, "db", "upgrade", "--database-url", db_url)
    assert code == 0 and "up to date" in out
    code, out, _ = _run(capsys, "db", "current", "--json", "--database-url", db_url)
    at_head = json.loads(out)
    assert code == 0 and at_head["up_to_date"] is True and at_head["current"] == at_head["head"]
    code, out, _ = _run(capsys, "db", "downgrade", "base", "--json", "--database-url", db_url)
    assert code == 0 and json.loads(out)["current"] is None
    code, out, _ = _run(capsys, "db", "current", "--json", "--database-url", db_url)
    assert code == 0 and json.loads(out)["up_to_date"] is False


def test_status_json_reports_calls_errors_and_latency(
    capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    with Monitor(db_url, sample_rate=1.0) as mon:
        ok = mon.wrap(lambda x: x, name="digits", version="v1")
        for _ in range(30):
            ok(np.zeros((2, 3)))

        def fail(x: object) -> object:
            raise RuntimeError("nope")

        bad = mon.wrap(fail, name="digits", version="v1")
        for _ in range(10):
            with pytest.raises(RuntimeError):
                bad(np.zeros((2, 3)))
    code, out, _ = _run(capsys, "status", "--json", "--window", "15m", "--database-url", db_url)
    assert code == 0
    report = json.loads(out)
    assert report["window_s"] == 900 and report["dropped"] == 0
    (row,) = report["models"]
    assert (row["model"], row["version"], row["arms"]) == ("digits", "v1", ["main"])
    assert row["calls"] == 40 and row["errors"] == 10 and row["error_rate"] == 0.25
    assert row["items"] == 80 and row["samples"] == 60
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]


def test_status_table_for_people(capsys: pytest.CaptureFixture[str], sqlite_url: str) -> None:
    with Monitor(sqlite_url) as mon:
        mon.wrap(abs, name="absval", version="v9")(-1)
    code, out, _ = _run(capsys, "status", "--database-url", sqlite_url)
    assert code == 0 and "absval" in out and "telemetry dropped: 0" in out


def test_bad_url_and_bad_window_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "status", "--database-url", "nonsense")
    assert code == 1 and "invalid database URL 'nonsense'" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "--window", "soon"])
    assert exit_info.value.code == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_schema_behind_names_the_upgrade(capsys: pytest.CaptureFixture[str], pg_url: str) -> None:
    code, _, err = _run(capsys, "status", "--database-url", pg_url)
    assert code == 1 and "tunewatch db upgrade" in err


def test_console_script_is_installed(sqlite_url: str) -> None:
    exe = shutil.which("tunewatch", path=str(Path(sys.executable).parent))
    assert exe is not None, "the tunewatch console script is not installed beside python"
    done = subprocess.run(
        [exe, "db", "current", "--database-url", sqlite_url], capture_output=True, text=True
    )
    assert done.returncode == 0 and "revision" in done.stdout
