"""One nightly run: extract every feed -> land -> stage -> map + build -> publish -> report.

Exit codes (the contract): 0 published, 1 refused by the quality gate (warehouse
unchanged), 2 failed (warehouse unchanged). The steps themselves are in
etl/pipeline/steps.py (`NightlyRun`), where an orchestrator can call them one by one.
"""

from __future__ import annotations

import datetime as dt
import logging
import traceback
from collections.abc import Callable
from pathlib import Path

from etl.config import SiteConfig
from etl.pipeline.lock import LockBusy, warehouse_lock
from etl.pipeline.steps import (
    EXIT_FAILED,
    EXIT_PUBLISHED,
    EXIT_REFUSED,
    NightlyRun,
    RunFailed,
    RunResult,
    new_run_id,
    run_log,
)

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_FAILED",
    "EXIT_PUBLISHED",
    "EXIT_REFUSED",
    "RunFailed",
    "RunResult",
    "new_run_id",
    "run_pipeline",
]


def run_pipeline(
    cfg: SiteConfig,
    workdir: Path,
    *,
    replay: str | None = None,
    run_date: dt.date | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the nightly job once; never raises for bad input or a failed step."""
    run = NightlyRun.start(cfg, workdir, replay=replay, run_date=run_date)
    try:
        # one run at a time per warehouse: a second one is refused before it reads a feed
        with warehouse_lock(cfg.warehouse, cfg.schema_name, run.run_id):
            for feed in run.feeds:
                run.extract(feed, on_step)
                run.land(feed, on_step)
            run.build(on_step)
            if run.gate(on_step):
                run.publish(on_step)
    except LockBusy as exc:
        with run_log(run.run_dir):
            log.error("run %s not started: %s", run.run_id, exc)
        return run.finish({"errors": [f"LockBusy: {exc}"]})
    except Exception as exc:  # recorded in the step's fragment; the run reports, never publishes
        log.debug("run %s stopped: %s\n%s", run.run_id, exc, traceback.format_exc())
    return run.finish()
