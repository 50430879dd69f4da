"""omop_vocabulary_refresh: a new Athena release, swapped in together with the CDM.

Manual trigger with the release folder (`release_path`; optionally `replay_run`, default
the last landed run). start -> stage_release (load and check the release into
SCHEMA_vocab_next; the published vocabulary untouched) -> replay (the run's landed
records) -> build (mapped against the staged release) -> diff (concepts deprecated,
mappings changed, domains changed, records that would move table) -> gate -> swap
(vocabulary and CDM in one transaction; updates the Asset omop://<site>/cdm) -> report.
A refused gate fails the run: nothing is swapped, and report.json (path in XCom `report`
and in the log) lists what the release would have changed.

All logic is in the `etl` package (etl/pipeline/refresh.py).
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import (
    Param,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException

from etl import orchestration as orch

CDM = orch.cdm_asset()
RETRY = orch.retry_policy()
_run = orch.resume_run


def _report(run) -> str:  # type: ignore[no-untyped-def]
    """Write the refresh's report; its path goes to XCom `report`; fail unless swapped."""
    from etl.pipeline.refresh import finish_refresh

    result = finish_refresh(run)
    path = str(result.run_dir / "report.json")
    get_current_context()["ti"].xcom_push(key="report", value=path)
    if result.status != "published":
        raise AirflowFailException(
            f"vocabulary refresh {result.run_id} {result.status}:"
            f" {'; '.join(result.report['errors'])} (report {path})"
        )
    return path


@dag(
    dag_id="omop_vocabulary_refresh",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "release_path": Param(type="string", description="Folder of the Athena release"),
        "replay_run": Param(
            None, type=["null", "string"], description="Run to re-map (default: last landed)"
        ),
    },
    default_args={
        "retries": 3,
        "retry_delay": dt.timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "retry_policy": RETRY,
    },
    tags=["omop"],
    doc_md=__doc__,
)
def omop_vocabulary_refresh() -> None:
    @task
    def start() -> str:
        from etl.pipeline import refresh

        params = get_current_context()["params"]
        site = orch.site_from_airflow()
        run = refresh.start_refresh(
            site.cfg, site.workdir, params["release_path"], params["replay_run"]
        )
        return run.run_id

    @task
    def stage_release(etl_run: str) -> dict:
        from etl.pipeline import refresh

        return refresh.stage_release(_run(etl_run))

    @task
    def replay(etl_run: str) -> None:
        run = _run(etl_run)
        for feed in run.feeds:  # copies of the landed Parquet: cheap, one task
            run.extract(feed)
            run.land(feed)

    @task
    def build(etl_run: str) -> None:
        _run(etl_run).build()

    @task
    def diff(etl_run: str) -> dict:
        from etl.pipeline import refresh

        changes = refresh.diff_release(_run(etl_run))
        return {k: changes[k] for k in ("concepts_deprecated", "mappings_changed")}

    @task
    def gate(etl_run: str) -> bool:
        run = _run(etl_run)
        if not run.gate():
            _report(run)  # raises: refused, the report path in XCom and log
        return True

    @task(outlets=[CDM])
    def swap(etl_run: str) -> dict:
        from etl.pipeline import refresh

        run = _run(etl_run)
        tables = refresh.swap(run)
        get_current_context()["outlet_events"][CDM].extra = {
            "run_id": etl_run,
            "cdm_schema": run.cfg.schema_name,
            "vocabulary_release": run.meta["vocabulary_release"],
        }
        return tables

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=0)
    def report(etl_run: str) -> str:
        return _report(_run(etl_run))

    etl_run = start()
    (
        stage_release(etl_run)
        >> replay(etl_run)
        >> build(etl_run)
        >> diff(etl_run)
        >> gate(etl_run)
        >> swap(etl_run)
        >> report(etl_run)
    )


omop_vocabulary_refresh()
