"""The Markdown report and latency-vs-throughput plot of a real tuning run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuner_fixtures import export, load_digits_split, trained_mlp

from tuner.batch_search import CurvePoint, MeasureConfig
from tuner.candidates import SearchSpace, Skipped
from tuner.engine import Trial, TuneResult, tune
from tuner.report import write_report


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> TuneResult:
    digits = load_digits_split()
    workdir = tmp_path_factory.mktemp("tune")
    base = export(trained_mlp(digits), digits.x_holdout, workdir / "mlp.onnx")
    space = SearchSpace(
        dynamic_op_types=("all",),
        static_methods=("MinMax",),
        static_activation_types=("QUInt8",),
        static_op_types=("all",),
        torch_dynamic=False,
        prune_amounts=(),
        threads=(1,),
        max_batch_size=32,
    )
    return tune(
        base,
        calibration=digits.x_calib,
        holdout=digits.x_holdout,
        labels=digits.y_holdout,
        slo_ms=5.0,
        workdir=workdir,
        space=space,
        measure=MeasureConfig(warmup_runs=1, window_runs=3, min_window_s=0.005, max_windows=4),
    )


def test_report_files_hold_the_leaderboard_and_the_plot(result: TuneResult, tmp_path: Path) -> None:
    paths = write_report(result, tmp_path / "report")
    assert paths.markdown.exists() and paths.plot.exists() and paths.json.exists()
    text = paths.markdown.read_text()
    assert "## Leaderboard" in text and "](latency_throughput.png)" in text
    assert result.winner is not None and f"**{result.winner.name}**" in text
    for trial in result.leaderboard:
        assert f"| {trial.name} |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(result.leaderboard)
    assert "| cuda-fp16 |" in text  # skipped GPU candidate, with its reason
    assert paths.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths.plot.stat().st_size > 10_000
    saved = json.loads(paths.json.read_text())
    assert saved["winner"] == result.winner.name
    assert len(saved["leaderboard"]) == len(result.leaderboard)


def test_report_without_winner_says_so_and_escapes_pipes(tmp_path: Path) -> None:
    point = CurvePoint(1, 3.0, 9.0, 333.0, True, 12, 0.02)
    failed = Trial(
        name="static-x",
        config={"runtime": {"threads": 1, "spinning": False}},
        artifact="x.onnx",
        sha256=None,
        passed=False,
        reason="guard failed: a|b",
        accuracy={"top1_agreement": 0.5},
        screen=point,
        curve=(point,),
    )
    empty = TuneResult(
        leaderboard=[failed],
        winner=None,
        skipped=[Skipped("cuda-fp16", "no CUDA")],
        objective="throughput",
        slo_ms=5.0,
        mode="smart",
        task="classification",
        elapsed_s=1.0,
        measurements=1,
        screen_batch_size=1,
    )
    paths = write_report(empty, tmp_path)
    text = paths.markdown.read_text()
    assert "Winner: none: no candidate passed the guard" in text
    assert "guard failed: a\\|b" in text and "top1_agreement 0.5000" in text
    assert paths.plot.exists()
