"""The Airflow DAGs end to end with `dag.test()`: a temporary AIRFLOW_HOME with a SQLite
metadata database, each DAG run in a process of its own (tests/airflow_driver.py), the
site config from a Variable and the warehouse from the Connection `omop_warehouse`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from etl.config import ConfigError
from etl.orchestration import warehouse_url
from etl.warehouse import open_warehouse
from tests.conftest import DEMO_SYNTHEA, REPO, TEST_KEY
from tests.pipeline_helpers import scalar, write_config
from tests.test_nightly_runs import snapshot
from tests.test_vocab_refresh import DEPRECATED, NEW_TARGET, REMAPPED, modified_vocabulary

ASSET_URI = "omop://test-site/cdm"


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A migrated SQLite metadata database in a temporary AIRFLOW_HOME."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "OMOP_ETL_SITE": "test-site",
        "OMOP_ETL_PSEUDONYM_KEY": TEST_KEY,
        "PYTHONPATH": str(REPO),
    }
    _driver(env, "init")
    return env


def _driver(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.airflow_driver", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def run_dag(
    env: dict[str, str],
    dag_id: str,
    site: dict[str, str],
    tmp: Path,
    *,
    conf: dict | None = None,
    inject_sql: str | None = None,
) -> tuple[dict[str, Any], str]:
    """One DAG run; its summary (state, tasks, XCom `report`, Asset events) and its log."""
    out = tmp / f"{dag_id}-{len(list(tmp.glob('*.out.json')))}.out.json"
    args = ["run", dag_id, str(out), "--conf", json.dumps(conf or {})]
    if inject_sql:
        args += ["--inject-sql", inject_sql]
    log = _driver({**env, **site}, *args)
    return json.loads(out.read_text()), log


def site_vars(config: Path, workdir: Path, connection: dict | None = None) -> dict[str, str]:
    env = {
        "AIRFLOW_VAR_OMOP_ETL_SITE_CONFIG": str(config),
        "AIRFLOW_VAR_OMOP_ETL_WORKDIR": str(workdir),
    }
    if connection is not None:
        env["AIRFLOW_CONN_OMOP_WAREHOUSE"] = json.dumps(connection)
    return env


@pytest.fixture(scope="module")
def duckdb_site(airflow_env, tmp_path_factory) -> dict[str, Any]:
    """The demo EHR feed published by the nightly DAG into a DuckDB warehouse."""
    tmp = tmp_path_factory.mktemp("nightly_duckdb")
    wh = open_warehouse(f"duckdb:///{tmp / 'warehouse.duckdb'}")
    config = write_config(tmp, wh, "main", DEMO_SYNTHEA)
    site = site_vars(config, tmp / "work")
    result, log = run_dag(airflow_env, "omop_nightly", site, tmp)
    yield {"tmp": tmp, "wh": wh, "site": site, "result": result, "log": log}
    wh.close()


def _xcom_path(result: dict[str, Any], task_id: str) -> str:
    value = result["report_xcom"][task_id]
    return json.loads(value) if value.startswith('"') else value


def _report(result: dict[str, Any], task_id: str) -> dict[str, Any]:
    return json.loads(Path(_xcom_path(result, task_id)).read_text())


def test_dagbag_imports_both_dags_without_heavy_modules(airflow_env, tmp_path) -> None:
    script = """
import json, os, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
heavy = sorted(m for m in ("duckdb", "pyarrow", "great_expectations", "psycopg",
                           "etl.pipeline.steps", "etl.warehouse") if m in sys.modules)
import sqlalchemy.exc
from etl.pipeline.steps import RunFailed
refused = sqlalchemy.exc.OperationalError("connect", {}, ConnectionRefusedError(111))
retry = {}
for d in bag.dags.values():
    for t in d.tasks:
        p = t.retry_policy
        retry[d.dag_id + "." + t.task_id] = (t.retries, p.evaluate(refused, 1, 4).action.value,
                                             p.evaluate(RunFailed("bad"), 1, 4).action.value)
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": sorted(bag.dags), "heavy": heavy, "retry": retry,
                  "nightly": sorted(bag.dags["omop_nightly"].task_ids),
                  "schedule": str(bag.dags["omop_nightly"].schedule)}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**airflow_env, "AIRFLOW_VAR_OMOP_ETL_NIGHTLY_CRON": "30 1 * * *"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    assert found["dags"] == ["omop_nightly", "omop_vocabulary_refresh"]
    assert found["heavy"] == []  # parsing a DAG file loads no driver, Arrow or GE
    assert found["nightly"] == [
        "build", "build_shard", "feed.extract", "feed.land", "feeds", "gate", "merge", "publish",
        "report", "start",
    ]  # fmt: skip
    assert found["schedule"] == "30 1 * * *"
    # a connection refused is retried, anything else fails at once; the report never retries
    retry = found["retry"]
    assert retry["omop_nightly.build"] == [3, "retry", "fail"]
    assert retry["omop_vocabulary_refresh.swap"] == [3, "retry", "fail"]
    assert retry["omop_nightly.report"][0] == retry["omop_vocabulary_refresh.report"][0] == 0
    assert {tuple(v[1:]) for v in retry.values()} == {("retry", "fail")}


def test_warehouse_url_from_the_connection_fields() -> None:
    assert warehouse_url("postgres", "db.local", "etl", "p@ss", 5433, "omop") == (
        "postgresql+psycopg://etl:p%40ss@db.local:5433/omop"
    )
    assert warehouse_url("duckdb", "/data/wh.duckdb") == "duckdb:////data/wh.duckdb"
    assert warehouse_url("generic", extra={"url": "duckdb:///x.duckdb"}) == "duckdb:///x.duckdb"
    with pytest.raises(ConfigError):
        warehouse_url("mysql", "h")


def test_nightly_dag_publishes_the_demo_on_duckdb(duckdb_site) -> None:
    result, wh = duckdb_site["result"], duckdb_site["wh"]
    assert result["state"] == "success", duckdb_site["log"][-3000:]
    assert set(result["tasks"].values()) == {"success"}
    assert "feed.extract[0]" in result["tasks"] and "feed.land[0]" in result["tasks"]
    report = _report(result, "report")
    assert report["status"] == "published" and report["errors"] == []
    ehr = report["feeds"]["ehr"]
    assert ehr["records_in"] == ehr["loaded"] + ehr["quarantined"] + ehr["filtered"] > 0
    assert report["tables"]["person"] == 27
    assert scalar(wh, "SELECT count(*) FROM main.person") == 27
    assert scalar(wh, "SELECT count(*) FROM main.condition_occurrence") == (
        report["tables"]["condition_occurrence"]
    ) > 0  # fmt: skip
    # the step timings of every task are merged into one report
    assert {"extract", "land", "stage", "gate", "publish"} <= set(report["timings"])
    [event] = [e for e in result["asset_events"] if e["uri"] == ASSET_URI]
    assert event["name"] == "omop_cdm" and event["dag_id"] == "omop_nightly"
    assert event["extra"]["run_id"] == report["run_id"]


def test_nightly_dag_in_three_shards_publishes_what_one_shard_does(
    airflow_env, duckdb_site, tmp_path
) -> None:
    """The Variable omop_etl_shards, read when the build task runs, splits the build."""
    one = _report(duckdb_site["result"], "report")
    wh = open_warehouse(f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    config = write_config(tmp_path, wh, "main", DEMO_SYNTHEA)
    site = {**site_vars(config, tmp_path / "work"), "AIRFLOW_VAR_OMOP_ETL_SHARDS": "3"}
    result, log = run_dag(airflow_env, "omop_nightly", site, tmp_path)
    assert result["state"] == "success", log[-3000:]
    assert set(result["tasks"].values()) == {"success"}
    shard_tasks = sorted(t for t in result["tasks"] if t.startswith("build_shard"))
    assert shard_tasks == ["build_shard[0]", "build_shard[1]", "build_shard[2]"]
    report = _report(result, "report")
    assert report["status"] == "published" and report["errors"] == []
    assert report["tables"] == one["tables"] and report["feeds"] == one["feeds"]
    assert {"build.shard_stage", "build.merge"} <= set(report["timings"])
    try:
        assert snapshot(wh, "main") == snapshot(duckdb_site["wh"], "main")  # ids included
    finally:
        wh.close()
        duckdb_site["wh"].close()


def test_refused_run_fails_the_dag_and_never_publishes(airflow_env, duckdb_site) -> None:
    wh, tmp = duckdb_site["wh"], duckdb_site["tmp"]
    before = snapshot(wh, "main")
    wh.close()  # DuckDB: one process at a time holds the file
    result, log = run_dag(
        airflow_env,
        "omop_nightly",
        duckdb_site["site"],
        tmp,
        inject_sql="INSERT INTO {S}.person SELECT * FROM {S}.person"
        " WHERE person_id = (SELECT min(person_id) FROM {S}.person)",
    )
    assert result["state"] == "failed"
    tasks = result["tasks"]
    assert (tasks["gate"], tasks["publish"], tasks["report"]) == (
        "failed", "upstream_failed", "failed",
    )  # fmt: skip
    assert tasks["build"] == "success"
    path = _xcom_path(result, "gate")
    assert _xcom_path(result, "report") == path
    report = json.loads(Path(path).read_text())
    assert report["status"] == "refused"
    assert any("refused by isPrimaryKey on person.person_id" in e for e in report["errors"])
    assert f"(report {path})" in log  # the failed task's log names the report
    assert snapshot(wh, "main") == before
    # no Asset event for the refused run
    assert report["run_id"] not in [e["extra"].get("run_id") for e in result["asset_events"]]


@pytest.mark.postgres
def test_nightly_dag_on_postgres_through_the_connection(airflow_env, pg_wh, tmp_path) -> None:
    wh, schema = pg_wh
    config = write_config(tmp_path, wh, schema, DEMO_SYNTHEA)
    # the YAML names a DuckDB file; the Connection omop_warehouse overrides it
    cfg = yaml.safe_load(config.read_text())
    cfg["warehouse"] = f"duckdb:///{tmp_path / 'not-used.duckdb'}"
    config.write_text(yaml.safe_dump(cfg))
    url = sa.engine.make_url(wh.url)
    connection = {
        "conn_type": "postgres",
        "host": url.host,
        "port": url.port,
        "login": url.username,
        "password": url.password,
        "schema": url.database,
    }
    result, log = run_dag(
        airflow_env, "omop_nightly", site_vars(config, tmp_path / "work", connection), tmp_path
    )
    assert result["state"] == "success", log[-3000:]
    report = _report(result, "report")
    assert report["status"] == "published"
    assert report["warehouse"].startswith("postgresql+psycopg://")
    assert scalar(wh, f'SELECT count(*) FROM "{schema}".person') == 27 == report["tables"]["person"]
    assert not (tmp_path / "not-used.duckdb").exists()


def test_vocabulary_refresh_dag_swaps_and_reports_changes(airflow_env, duckdb_site) -> None:
    wh, tmp = duckdb_site["wh"], duckdb_site["tmp"]
    release = modified_vocabulary(tmp)
    before = snapshot(wh, "main")
    wh.close()  # DuckDB: one process at a time holds the file
    result, log = run_dag(
        airflow_env, "omop_vocabulary_refresh", duckdb_site["site"], tmp,
        conf={"release_path": str(release)},
    )  # fmt: skip
    assert result["state"] == "success", log[-3000:]
    assert set(result["tasks"].values()) == {"success"}
    report = _report(result, "report")
    assert report["status"] == "published"
    changes = report["vocabulary_changes"]
    assert [c["concept_id"] for c in changes["deprecated"]] == [DEPRECATED]
    assert {m["concept_id"]: m["new_targets"] for m in changes["mapping_changes"]} == {
        DEPRECATED: [],
        REMAPPED: [NEW_TARGET],
    }
    assert [(m["from_table"], m["to_table"], m["rows"]) for m in changes["rows_moving"]] == [
        ("condition_occurrence", "observation", 4)
    ]
    assert report["vocabulary_refresh"]["vocabulary_version"] == "v-next"
    # vocabulary and CDM swapped together
    deprecated = f"SELECT invalid_reason FROM main.concept WHERE concept_id = {DEPRECATED}"
    assert scalar(wh, deprecated) == "D"
    assert scalar(wh, "SELECT vocabulary_version FROM main.cdm_source") == "v-next"
    assert scalar(wh, "SELECT count(*) FROM main.observation WHERE observation_source_value"
                      f" = '444814009' AND observation_concept_id = {NEW_TARGET}") == 4  # fmt: skip
    assert scalar(wh, "SELECT count(*) FROM main.condition_occurrence"
                      " WHERE condition_source_value = '444814009'") == 0  # fmt: skip
    assert scalar(wh, "SELECT count(*) FROM main.condition_occurrence WHERE condition_concept_id"
                      " = 0 AND condition_source_value = '195662009'") == 2  # fmt: skip
    assert "main_vocab_next" not in sa.inspect(wh.engine).get_schema_names()
    assert sorted(r[0] for r in before["person"]) == sorted(
        r[0] for r in snapshot(wh, "main")["person"]
    )  # person ids stable across the re-mapping
    assert any(e["dag_id"] == "omop_vocabulary_refresh" for e in result["asset_events"])


def test_a_failed_feed_fails_the_run_at_once_with_its_report(airflow_env, tmp_path) -> None:
    wh = open_warehouse(f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    config = write_config(tmp_path, wh, "main", tmp_path / "no-such-feed")
    result, log = run_dag(airflow_env, "omop_nightly", site_vars(config, tmp_path), tmp_path)
    assert result["state"] == "failed"
    tasks = result["tasks"]
    assert (tasks["feed.extract[0]"], tasks["feed.land[0]"], tasks["build"]) == (
        "failed", "upstream_failed", "upstream_failed",
    )  # fmt: skip
    assert (tasks["publish"], tasks["report"]) == ("upstream_failed", "failed")
    report = _report(result, "report")
    assert report["status"] == "failed"
    assert any("no-such-feed is not a folder" in e for e in report["errors"])
    assert "up_for_retry" not in log  # bad input is not retried
