"""``tunewatch serve``'s scheduler: APScheduler with its job store in tunewatch's database.

Jobs are registered idempotently (fixed ids, ``replace_existing``) as ``tuner.jobs:run`` with
the job's id, reference and interval as arguments, so the persistent store holds only plain
strings. The job store pickles job state: point it only at a database you trust.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from monitor.settings import Settings
from monitor.storage import Database
from tuner import jobs

log = logging.getLogger("tunewatch.serve")


def build_scheduler(settings: Settings, db: Database) -> BackgroundScheduler:
    """A scheduler with every job of ``settings`` registered (safe to call repeatedly)."""
    jobs.configure(settings, db)
    store = SQLAlchemyJobStore(engine=db.engine)
    create_job_table(store)
    scheduler = BackgroundScheduler(
        jobstores={"default": store},
        executors={"default": ThreadPoolExecutor(4)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC",
    )
    for spec in jobs.job_specs(settings):
        jobs.resolve(spec.ref)  # fail at start-up, not at the first run, on a bad reference
        scheduler.add_job(
            "tuner.jobs:run", IntervalTrigger(seconds=spec.interval_s, start_date=jobs.ANCHOR),
            args=[spec.job_id, spec.ref, spec.interval_s], id=spec.job_id, name=spec.job_id,
            replace_existing=True,
        )  # fmt: skip
    return scheduler


def create_job_table(store: SQLAlchemyJobStore, attempts: int = 5) -> None:
    """Create APScheduler's job table once, even when several processes start together.

    The job store checks for its table and then creates it, which is not atomic: two
    ``tunewatch serve`` processes starting at once on PostgreSQL both issue CREATE TABLE and one
    fails on pg_type's unique index. The loser finds the winner's table and goes on.
    """
    from sqlalchemy import exc, inspect

    table = store.jobs_t
    for attempt in range(attempts):
        try:
            table.create(store.engine, checkfirst=True)
            return
        except exc.DBAPIError:
            if inspect(store.engine).has_table(table.name, schema=table.schema):
                return
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def serve(settings: Settings, *, stop: threading.Event | None = None, api: Any = None) -> int:
    """Run the scheduler (and the API server, when given) until SIGTERM/SIGINT or ``stop``.

    On a signal the scheduler stops taking new runs and waits for the running job to end.
    """
    db = Database(settings.database_url)
    stop = stop or threading.Event()
    scheduler = build_scheduler(settings, db)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping after the running job", signum)
        stop.set()
        if api is not None:
            api.should_exit = True

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    scheduler.start()
    log.info("tunewatch serve: %d jobs scheduled", len(scheduler.get_jobs()))
    try:
        if api is not None:
            api.run()
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)
        db.dispose()
    log.info("tunewatch serve: stopped")
    return 0
