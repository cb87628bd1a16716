"""A model's tolerance (its policy) judges tuning, the fidelity check and experiments alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_fidelity import cli_fidelity, degraded, derive, make_champion, serve, setup
from tuner import registry
from tuner.cli import main
from tuner.errors import TunerError
from tuner.guard import Tolerance


def test_a_policy_tolerance_changes_the_fidelity_verdict(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, db = setup(sqlite_url, tmp_path)
    make_champion(db, derive(db, settings, tmp_path, "stale", degraded))
    serve(sqlite_url, 80)
    assert cli_fidelity(sqlite_url, capsys)["passed"] is False  # default: 99 % agreement

    loose = ["--tolerance", "min_top1_agreement=0.5", "--tolerance", "min_mean_cosine=none",
             "--tolerance", "max_rel_error=none"]  # fmt: skip
    assert main(["policy", "clf", *loose, "--database-url", sqlite_url]) == 0
    assert "min_top1_agreement" in capsys.readouterr().out
    out = cli_fidelity(sqlite_url, capsys)
    assert out["passed"] is True
    assert registry.tolerance(db, "clf").min_top1_agreement == 0.5
    db.dispose()


def test_a_bad_tolerance_is_refused_by_name(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, db = setup(sqlite_url, tmp_path)
    code = main(["policy", "clf", "--tolerance", "min_top1_agreemnt=0.9",
                 "--database-url", sqlite_url])  # fmt: skip
    assert code != 0
    assert "min_top1_agreemnt" in capsys.readouterr().err
    code = main(["policy", "clf", "--tolerance", "min_top1_agreement=high",
                 "--database-url", sqlite_url])  # fmt: skip
    assert code != 0
    assert "min_top1_agreement=high" in capsys.readouterr().err
    assert registry.policy(db, "clf") == {}  # nothing stored
    db.dispose()


def test_tolerance_from_dict_keeps_defaults_and_refuses_non_numbers() -> None:
    t = Tolerance.from_dict({"min_top1_agreement": 0.995, "max_rel_error": None})
    assert (t.min_top1_agreement, t.max_rel_error) == (0.995, None)
    assert t.min_mean_cosine == Tolerance().min_mean_cosine
    with pytest.raises(TunerError, match="True"):
        Tolerance.from_dict({"min_top1_agreement": True})


def test_the_experiment_judges_fidelity_with_the_model_tolerance() -> None:
    import numpy as np

    from monitor.settings import Settings
    from tuner import fidelity
    from tuner.analysis import _judge_fidelity

    def rep(scores: list[float]) -> fidelity.Replay:
        arr = np.asarray(scores)
        return fidelity.Replay("m", "v", "s", "a", len(arr), "classification",
                               {"top1_agreement": float(arr.mean())}, True, "ok", "",
                               scores=arr)  # fmt: skip

    champion, challenger = rep([1.0] * 2000), rep([1.0] * 1900 + [0.0] * 100)  # 5 points less
    settings = Settings()
    verdict, _ = _judge_fidelity(champion, challenger, settings, Tolerance())
    assert verdict == "worse"  # beyond the default 1 point
    loose = Tolerance.from_dict({"min_top1_agreement": 0.9})  # the model allows 10 points
    verdict, _ = _judge_fidelity(champion, challenger, settings, loose)
    assert verdict == "same"
