"""The ``tunewatch`` command line: output, JSON shape and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from monitor import Monitor, schema
from monitor.storage import Database, utcnow
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


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr of a command that must fail with exactly one line, no traceback."""
    try:
        code = main(list(argv))
    except SystemExit as exit_info:  # argparse's own refusals
        code = int(exit_info.code or 0)
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err


def test_bad_arguments_give_one_line_and_a_non_zero_exit(
    capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    url = ("--database-url", sqlite_url)
    code, err = _one_line_error(capsys, "status", "--window", "99999999999d", *url)
    assert code == 2 and "invalid duration '99999999999d'" in err and "--help" in err
    code, err = _one_line_error(capsys, "status", "--window", "0s", *url)
    assert code == 2 and "use more than 0" in err
    code, err = _one_line_error(capsys, "status", "--database-url", "mysql://ann:pw@db/prod")
    assert code == 1 and "'MySQLdb'" in err and "mysql://ann:***@db/prod" in err
    assert "pw@" not in err
    code, err = _one_line_error(capsys, "approve", "9223372036854775808", "--by", "ann", *url)
    assert code == 1
    assert err == "error: promotion id 9223372036854775808 is out of range: ids run from 1 to " \
        "9223372036854775807\n"  # fmt: skip
    code, err = _one_line_error(capsys, "reject", "0", "--by", "ann", *url)
    assert code == 1 and "promotion id 0 is out of range" in err
    code, err = _one_line_error(capsys, "events", "ack", "9223372036854775808", *url)
    assert code == 1 and "event id 9223372036854775808 is out of range" in err
    code, err = _one_line_error(capsys, "promotions", "--status", "zzz", *url)
    assert code == 2 and "invalid choice: 'zzz'" in err


def test_a_closed_pipe_ends_quietly(sqlite_url: str) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "status", "--json", "--database-url", sqlite_url],
        stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
    )  # fmt: skip
    os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""


def test_calls_per_s_is_over_the_active_span(
    capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    db = Database(sqlite_url)
    start = utcnow().replace(microsecond=0) - timedelta(minutes=30)
    with db.session() as s:
        for i in range(3):  # three 10-s intervals back to back: 30 s of traffic in an hour
            s.add(schema.LatencyAggregate(
                instance_id="p1", model="burst", version="v1", arm="main",
                interval_start=start + timedelta(seconds=10 * i), interval_s=10, calls=100,
                errors=0, items=100, sum_ms=100.0, min_ms=1.0, max_ms=1.0, p50_ms=1.0,
                p95_ms=1.0, p99_ms=1.0, buckets={"1": 100}, error_types={}, updated_at=start,
            ))  # fmt: skip
    db.dispose()
    code, out, _ = _run(capsys, "status", "--json", "--window", "1h", "--database-url", sqlite_url)
    (row,) = json.loads(out)["models"]
    assert code == 0 and row["calls"] == 300
    assert row["active_s"] == 30 and row["calls_per_s"] == 10.0  # not 300 / 3600
