"""omop_nightly: the nightly run of the OMOP ETL, one Airflow task per step.

start -> feeds -> feed[<name>] (extract -> land, one mapped task group per feed) -> build
-> build_shard[k] (one mapped task per shard) -> merge -> gate -> publish -> report.
`build` reads the shard count N from the Variable `omop_etl_shards` when it runs (default
1: `build` builds everything and build_shard[0] and merge have nothing to do); with N > 1
it runs the global steps, each build_shard[k] builds the persons of shard k (in parallel
on a Celery or Kubernetes executor, against PostgreSQL) and merge merges them, ids as one
build numbers them. A refused gate fails the gate task (publish never runs) and the
report task, which writes report.json whatever happened and fails unless the run
published; its path is in both tasks' logs and in XCom (key `report`). Publishing
updates the Asset `omop_cdm` (uri omop://<site>/cdm) that downstream DAGs can be
scheduled on. Transient database errors are retried; nothing else is.

All logic is in the `etl` package (etl/pipeline/steps.py): `omop-etl run` runs the same
steps without Airflow. Configuration: Variables `omop_etl_site_config` (path of the site
YAML), `omop_etl_workdir`, Connection `omop_warehouse` (see README, "Running under
Airflow").
"""

from __future__ import annotations

import datetime as dt
import logging

import pendulum
from airflow.sdk import (
    TriggerRule,
    dag,
    get_current_context,
    task,
    task_group,
)
from airflow.sdk.exceptions import AirflowFailException

from etl import orchestration as orch

log = logging.getLogger(__name__)

CDM = orch.cdm_asset()
RETRY = orch.retry_policy()
_run = orch.resume_run


def _report(run) -> str:  # type: ignore[no-untyped-def]
    """Write the run's report; its path goes to XCom `report`; fail unless published."""
    result = run.finish()
    path = str(result.run_dir / "report.json")
    get_current_context()["ti"].xcom_push(key="report", value=path)
    if result.status != "published":
        raise AirflowFailException(
            f"run {result.run_id} {result.status}: {'; '.join(result.report['errors'])}"
            f" (report {path})"
        )
    return path


@dag(
    dag_id="omop_nightly",
    schedule=orch.nightly_cron(),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 3,
        "retry_delay": dt.timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "retry_policy": RETRY,
    },
    tags=["omop"],
    doc_md=__doc__,
)
def omop_nightly() -> None:
    @task
    def start() -> str:
        from etl.pipeline.steps import NightlyRun

        site = orch.site_from_airflow()
        logical = get_current_context().get("logical_date")
        run = NightlyRun.start(site.cfg, site.workdir, run_date=logical.date() if logical else None)
        return run.run_id

    @task
    def feeds(etl_run: str) -> list[str]:
        return _run(etl_run).feeds

    @task_group(group_id="feed")
    def feed(etl_run: str, name: str) -> None:
        @task(map_index_template="{{ feed }}")
        def extract(etl_run: str, name: str) -> int:
            get_current_context()["feed"] = name  # type: ignore[typeddict-unknown-key]
            return _run(etl_run).extract(name)

        @task(map_index_template="{{ feed }}")
        def land(etl_run: str, name: str, records_in: int) -> dict:
            get_current_context()["feed"] = name  # type: ignore[typeddict-unknown-key]
            return _run(etl_run).land(name)

        land(etl_run, name, extract(etl_run, name))

    @task
    def build(etl_run: str) -> list[int]:
        from etl.pipeline.shards import shards_from_airflow

        return _run(etl_run).build_global(shards_from_airflow())

    @task(map_index_template="{{ shard }}")
    def build_shard(etl_run: str, shard: int) -> dict:
        get_current_context()["shard"] = shard  # type: ignore[typeddict-unknown-key]
        return _run(etl_run).build_shard(shard)

    @task
    def merge(etl_run: str) -> None:
        _run(etl_run).merge_shards()

    @task
    def gate(etl_run: str) -> bool:
        run = _run(etl_run)
        if not run.gate():
            _report(run)  # raises: the run is refused, the report path in XCom and log
        return True

    @task(outlets=[CDM])
    def publish(etl_run: str) -> dict:
        run = _run(etl_run)
        tables = run.publish()
        get_current_context()["outlet_events"][CDM].extra = {
            "run_id": etl_run,
            "cdm_schema": run.cfg.schema_name,
            "rows": sum(tables.values()),
        }
        return tables

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=0)
    def report(etl_run: str) -> str:
        return _report(_run(etl_run))

    etl_run = start()
    landed = feed.partial(etl_run=etl_run).expand(name=feeds(etl_run))
    shards = build(etl_run)
    landed >> shards
    built = build_shard.partial(etl_run=etl_run).expand(shard=shards)
    built >> merge(etl_run) >> gate(etl_run) >> publish(etl_run) >> report(etl_run)


omop_nightly()
