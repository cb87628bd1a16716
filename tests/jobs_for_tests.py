"""Job bodies that tests register through ``extra_jobs`` (real module:function references)."""

from __future__ import annotations

import os
import time

from tuner.jobs import slot_of


def record_slot() -> dict[str, int]:
    """Append ``slot pid`` to $TW_TEST_JOB_LOG: duplicates would mean a double run."""
    slot = slot_of(1)
    with open(os.environ["TW_TEST_JOB_LOG"], "a") as log:
        log.write(f"{slot} {os.getpid()}\n")
    time.sleep(0.3)
    return {"slot": slot}


def slow() -> dict[str, str]:
    """Run for two seconds, then leave a mark that the run finished."""
    time.sleep(2.0)
    with open(os.environ["TW_TEST_JOB_LOG"], "a") as log:
        log.write("finished\n")
    return {"done": "yes"}


def broken() -> None:
    """Always fails, to show a failing job never stops the scheduler."""
    raise RuntimeError("this job is broken on purpose")
