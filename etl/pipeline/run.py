"""One nightly run: extract every feed -> land -> stage -> map + build -> publish -> report.

Exit codes (the contract): 0 published, 1 refused by the quality gate (warehouse
unchanged), 2 failed (warehouse unchanged). The steps themselves are in
etl/pipeline/steps.py (`NightlyRun`), where an orchestrator can call them one by one.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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
    shards: int = 1,
    shard_workers: int = 1,
) -> RunResult:
    """Run the nightly job once; never raises for bad input or a failed step.

    `shards` > 1: build in that many shards of persons (etl/pipeline/shards.py), one
    after another, or `shard_workers` at a time in worker processes on PostgreSQL."""
    run = NightlyRun.start(cfg, workdir, replay=replay, run_date=run_date)
    try:
        # one run at a time per warehouse: a second one is refused before it reads a feed
        with warehouse_lock(cfg.warehouse, cfg.schema_name, run.run_id):
            run.extract_all(on_step)
            if shards == 1:
                run.build(on_step)
            else:
                _sharded_build(run, shards, shard_workers, on_step)
            if run.gate(on_step):
                run.publish(on_step)
    except LockBusy as exc:
        with run_log(run.run_dir):
            log.error("run %s not started: %s", run.run_id, exc)
        return run.finish({"errors": [f"LockBusy: {exc}"]})
    except Exception as exc:  # recorded in the step's fragment; the run reports, never publishes
        log.debug("run %s stopped: %s\n%s", run.run_id, exc, traceback.format_exc())
    return run.finish()


def _sharded_build(
    run: NightlyRun, shards: int, workers: int, on_step: Callable[[str], None] | None
) -> None:
    """build_global -> every shard (in worker processes on PostgreSQL) -> merge_shards."""
    numbers = run.build_global(shards, on_step)
    if workers > 1 and not run.cfg.warehouse.startswith("duckdb"):
        # spawned, not forked: a child never shares the parent's database connections
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, shards), mp_context=ctx) as pool:
            futures = [
                pool.submit(build_shard_in_process, run.cfg, run.workdir, run.run_id, k)
                for k in numbers
            ]
            for future in futures:
                future.result()  # the first failed shard fails the build
    else:
        if workers > 1:
            log.info("DuckDB has a single writer: the %d shards run one after another", shards)
        for k in numbers:
            run.build_shard(k, on_step)
    run.merge_shards(on_step)


def build_shard_in_process(cfg: SiteConfig, workdir: Path, run_id: str, shard: int) -> None:
    """Build one shard of run `run_id` (the body of a worker process)."""
    NightlyRun.resume(cfg, workdir, run_id).build_shard(shard)
